"""The generic step loop shared by pretraining and fine-tuning: step, report, checkpoint, stop cleanly on preemption."""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..flops import ImageFlops
from .checkpointing import CheckpointManager
from .config import RunConfig
from .tracking import Tracker

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: SLURM's --signal=USR1@<seconds> warning


@dataclass
class LoopEnd:
    """Where the loop stopped: ``reason`` is ``"done"``, ``"max_steps"`` or ``"preempted"``."""

    step: int
    data_epoch: int
    reason: str


class _StopFlag:
    """Records a preemption signal; the loop acts on it at the next optimizer-step boundary.

    Also counts as one: the ``deepspeed`` runner going away under a rank started by ``deepspeed.launcher.launch``.
    The runner does not pass SIGTERM on: it dies and leaves ``launch`` and the ranks training unsupervised, so a
    rank whose launcher lost its parent checkpoints and stops as if signalled.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.launcher_gone = False
        self._previous: dict[int, Any] = {}
        self._launcher, self._launcher_parent = _deepspeed_launcher()

    @property
    def stopping(self) -> bool:
        if self._launcher is not None and not self.launcher_gone:
            import psutil

            try:
                self.launcher_gone = self._launcher.ppid() != self._launcher_parent
            except psutil.Error:  # the launcher itself is gone
                self.launcher_gone = True
        return self.signal is not None or self.launcher_gone

    def __enter__(self) -> _StopFlag:
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _deepspeed_launcher() -> tuple[Any, int]:
    """``(psutil.Process of deepspeed.launcher.launch, its parent's pid)`` if that launcher started us."""
    import psutil

    try:
        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
            return parent, parent.ppid()
    except psutil.Error:
        pass
    return None, 0


@contextmanager
def _preemption_signals_blocked() -> Iterator[None]:
    """Hold back preemption signals while the loader may fork its DataLoader workers (at ``iter``/``next``).

    SLURM and the deepspeed launcher signal every process of the job, and torch's worker SIGTERM handler kills a
    worker, which fails the step the main process still has to finish before it checkpoints. Our shard stream makes
    its workers ignore these signals, but only once they start iterating; workers inherit the signal mask they were
    forked with, so forked under this block they are safe from the start, whatever the loader. The main process
    receives a signal that arrived meanwhile as soon as the block lifts.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on this rank (CUDA), else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def train_loop(
    engine: Any,
    loader: Any,
    compute_loss: Callable[[dict], torch.Tensor],
    *,
    start_step: int,
    total_steps: int,
    data_epoch: int,
    tracker: Tracker,
    checkpoints: CheckpointManager,
    checkpoint_every: int,
    client_state: Callable[[int, int], dict],
    max_steps: int = 0,
    log_every: int = 20,
    on_step: Callable[[int, dict], None] | None = None,
    on_epoch_end: Callable[[int, int], None] | None = None,
    run: RunConfig | None = None,
    flops: ImageFlops | None = None,
) -> LoopEnd:
    """Run optimizer steps ``start_step + 1 .. total_steps`` (or ``max_steps``) over ``loader``'s epochs.

    ``compute_loss(batch)`` returns this rank's scalar loss for one micro batch; DeepSpeed accumulates micro
    batches into optimizer steps. Every step the ranks agree (one tiny all-reduce) on whether a preemption
    signal arrived and whether any loss was non-finite: a signal writes a checkpoint and ends the loop; a
    non-finite loss raises ``FloatingPointError`` naming the step (fp16 overflow steps that DeepSpeed's loss
    scaler skips are counted, not fatal). ``client_state(step, data_epoch)`` is stored in every checkpoint.
    ``on_step(step, batch)`` runs after every optimizer step; ``on_epoch_end(data_epoch, step)`` after every data
    epoch that ran to its end (on all ranks together: training streams give every rank the same batch count).
    ``run`` holds the run options (``compile``, ``profile_steps``, ``on_nonfinite``, ...); ``flops`` the model's
    forward FLOPs per image, for TFLOP/s and MFU.
    """
    device = engine.device
    stop_at = min(total_steps, max_steps) if max_steps else total_steps
    step = start_step
    global_batch = engine.train_batch_size()
    loss_sum, loss_count, wait, window_start, window_steps = 0.0, 0, 0.0, time.perf_counter(), 0
    reason = "done"
    with _StopFlag() as stop:
        while step < stop_at:
            loader.set_epoch(data_epoch)
            with _preemption_signals_blocked():
                batches: Iterable[dict] = iter(loader)
            while step < stop_at:
                fetch_start = time.perf_counter()
                with _preemption_signals_blocked():
                    batch = next(batches, None)
                wait += time.perf_counter() - fetch_start
                if batch is None:
                    break
                loss = compute_loss(batch)
                engine.backward(loss)
                boundary = engine.is_gradient_accumulation_boundary()
                if boundary:  # the LR this optimizer step applies; engine.step() moves the schedule to the next one
                    lr = max(engine.get_lr())
                engine.step()
                loss_sum += loss.detach().float().item()
                loss_count += 1
                if not boundary:
                    continue
                step += 1
                window_steps += 1
                preempted, bad_loss = _all_reduce_max([float(stop.stopping), float(not math.isfinite(
                    loss_sum))], device)
                if bad_loss:
                    raise FloatingPointError(
                        f"the loss became non-finite at step {step} (last value {loss_sum / loss_count:.4g} on rank "
                        f"{torch.distributed.get_rank() if torch.distributed.is_initialized() else 0}): lower "
                        "optim.base_lr or optim.clip_grad, or use bf16 instead of fp16; the last checkpoint is intact"
                    )
                if step % log_every == 0 or step == stop_at or preempted:
                    elapsed = time.perf_counter() - window_start
                    total_loss, total_count, skipped = _all_reduce_sum(
                        [loss_sum, loss_count, float(getattr(loader, "skipped", 0))], device)
                    grad_norm = engine.get_global_grad_norm()
                    metrics = {
                        "train/loss": total_loss / max(total_count, 1),
                        "train/lr": lr,
                        "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "train/images_per_s": global_batch * window_steps / elapsed,
                        "train/data_wait_s": wait / window_steps,
                        "train/peak_memory_mb": peak_memory_mb(),
                        "train/epoch": data_epoch,
                        "train/skipped_samples": int(skipped),
                        "train/skipped_steps": int(getattr(engine, "skipped_steps", 0)),
                        "train/eta_min": tracker.eta_seconds(step) / 60,
                    }
                    tracker.log(metrics, step)
                    loss_sum, loss_count, wait, window_start, window_steps = 0.0, 0, 0.0, time.perf_counter(), 0
                if on_step is not None:
                    on_step(step, batch)
                if preempted:
                    reason = "preempted"
                    cause = "the deepspeed runner is gone" if stop.launcher_gone else "preemption signal received"
                    tracker.print(f"{cause}: checkpointing at step {step} and stopping")
                    break
                if checkpoint_every and step % checkpoint_every == 0 and step < stop_at:
                    checkpoints.save(engine, step, client_state(step, data_epoch))
            if batch is None and on_epoch_end is not None:  # the loader ran dry: data epoch done (e.g. evaluate)
                on_epoch_end(data_epoch, step)
            data_epoch += 1  # a resumed run starts the next epoch (there is no mid-epoch position to return to)
            if reason == "preempted":
                break
    if reason != "preempted" and max_steps and step < total_steps:
        reason = "max_steps"
    if step > start_step:  # nothing new to save (a finished run started again): leave its last checkpoint alone
        checkpoints.save(engine, step, client_state(step, data_epoch))
    return LoopEnd(step, data_epoch, reason)
