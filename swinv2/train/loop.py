"""The generic step loop shared by pretraining and fine-tuning: step, report, checkpoint, stop cleanly on preemption,
recover from a non-finite loss; no host-device sync between report steps."""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..flops import ImageFlops
from .checkpoint_manager import CheckpointManager
from .config import ConfigError, RunConfig
from .slurm import requeue_job, requeue_wanted
from .throughput import Peak, PhaseTimer, device_peak, step_flops
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


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on this rank (CUDA), else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class _LossWatch:
    """This rank's losses and non-finite steps since the ranks last agreed, kept on the device.

    Per micro batch only device ops run (no host read): the finite losses are summed, and the loss returned for the
    backward is multiplied by 1 (finite) or NaN (not), so a non-finite loss always makes the gradients non-finite.
    DeepSpeed then drops that update on every rank: the gradients are averaged across ranks before its overflow
    check, whose result it all-reduces (``engine.skipped_steps`` counts it). Multiplying by exactly 1 leaves the
    loss and its gradients bit for bit as they were.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset_losses()
        self.reset_flags()

    def reset_losses(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=self.device)

    def reset_flags(self) -> None:
        self.step_bad = torch.zeros((), dtype=torch.bool, device=self.device)  # the step in progress
        self.bad_steps: list[torch.Tensor] = []  # one flag per step since the last agreement
        self.first_bad = torch.zeros((), dtype=torch.float64, device=self.device)  # its step number (0: none)
        self.first_value = torch.zeros((), dtype=torch.float64, device=self.device)  # and its loss

    def micro_batch(self, loss: torch.Tensor) -> torch.Tensor:
        value = loss.detach().double()
        finite = torch.isfinite(value)
        self.loss_sum += torch.where(finite, value, 0.0)
        self.loss_count += finite
        first = ~finite & ~self.step_bad & (self.first_bad == 0)
        self.first_value = torch.where(first, value, self.first_value)
        self.step_bad = self.step_bad | ~finite
        gate = torch.where(finite, torch.ones_like(loss), torch.full_like(loss, float("nan")))
        return loss * gate

    def end_step(self, step: int) -> None:
        self.first_bad = torch.where(self.step_bad & (self.first_bad == 0), float(step), self.first_bad)
        self.bad_steps.append(self.step_bad)
        self.step_bad = torch.zeros((), dtype=torch.bool, device=self.device)


@dataclass
class _Agreement:
    """What all ranks agree on at a sync step (one blocking all-reduce)."""

    preempted: bool
    loss_sum: float
    loss_count: float
    skipped_samples: float
    bad_steps: int  # steps since the last agreement with a non-finite loss on some rank
    first_bad: int  # the first of them (0: none), the rank that saw it and its loss there
    first_rank: int
    first_value: float


def _agree(watch: _LossWatch, stopping: bool, skipped_samples: float, rank: int, world: int) -> _Agreement:
    """One all-reduce (sum) of this rank's preemption flag, loss window and non-finite steps; then a host read."""
    host = torch.tensor([float(stopping), skipped_samples], dtype=torch.float64)
    per_rank = torch.zeros(2 * world, dtype=torch.float64, device=watch.device)
    per_rank[rank] = watch.first_bad  # each rank its own slot, so the sum keeps every rank's value
    per_rank[world + rank] = watch.first_value
    flags = torch.stack(watch.bad_steps).double() if watch.bad_steps else per_rank.new_zeros(0)
    vector = torch.cat([host.to(watch.device), watch.loss_sum[None], watch.loss_count[None], flags, per_rank])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(vector)
    values = vector.tolist()
    n = len(watch.bad_steps)
    firsts = values[4 + n: 4 + n + world]
    bad_ranks = [r for r in range(world) if firsts[r] > 0]
    first_rank = min(bad_ranks, key=lambda r: firsts[r]) if bad_ranks else 0
    return _Agreement(
        preempted=values[0] > 0, skipped_samples=values[1], loss_sum=values[2], loss_count=values[3],
        bad_steps=sum(1 for f in values[4: 4 + n] if f > 0), first_bad=int(firsts[first_rank]),
        first_rank=first_rank, first_value=values[4 + n + world + first_rank],
    )


def _drops_nonfinite_updates(engine: Any) -> bool:
    """Whether DeepSpeed's optimizer skips a step whose gradients are not finite (what ``skip`` relies on).

    fp16 (loss scaler), bf16 with ``bf16.check_grad_overflow`` (DeepSpeed's default) and ZeRO 1-3 in fp32 (a
    non-finite gradient norm) do; fp32 without ZeRO runs the plain torch optimizer, which applies anything.
    """
    optimizer = engine.optimizer
    if not hasattr(optimizer, "overflow"):
        return False
    if getattr(optimizer, "check_grad_overflow", True):
        return True
    return bool(getattr(optimizer, "compute_grad_norm", False)) and getattr(optimizer, "dtype", None) != torch.bfloat16


def _nonfinite_message(agreed: _Agreement) -> str:
    return (f"the loss became non-finite at step {agreed.first_bad} (last value {agreed.first_value:.4g} on rank "
            f"{agreed.first_rank}): lower optim.base_lr or optim.clip_grad, or use bf16 instead of fp16; the last "
            "checkpoint is intact")


class _Profiler:
    """A torch profiler trace of optimizer steps ``first..last`` (``run.profile_steps``), one chrome-trace JSON per
    rank in ``<output_dir>/profile/``; each step is a ``train_step_<n>`` range in it (torch.profiler docs)."""

    def __init__(self, steps: list[int], folder: Path, rank: int):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.path = folder / f"trace_steps{self.first}-{self.last}_rank{rank}.json"
        self.profile: Any = None
        self.range: Any = None

    def begin(self, step: int) -> None:
        """Before the first micro batch of optimizer step ``step``."""
        if self.range is not None or not self.first <= step <= self.last:
            return
        if self.profile is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()
        self.range = torch.profiler.record_function(f"train_step_{step}")
        self.range.__enter__()

    def end(self, step: int) -> None:
        """After optimizer step ``step``."""
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None
        if self.profile is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        if self.profile is None:
            return
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None
        self.profile.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.profile.export_chrome_trace(str(self.path))
        self.profile = None
        self.first = self.last + 1  # done: a rollback that replays these steps does not profile them again


class _Throughput:
    """TFLOP/s per device and MFU of the steps since the last report (:mod:`.throughput`)."""

    def __init__(self, engine: Any, flops: ImageFlops | None, run: RunConfig, precision: str):
        self.flops_per_step = 0
        self.peak: Peak | None = None
        if flops is None:
            return
        micro, accumulation = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
        self.flops_per_step = step_flops(flops, micro, accumulation)
        if torch.distributed.is_initialized():  # ranks sharing a CPU measure its peak together, each its share
            torch.distributed.barrier()
        self.peak = device_peak(engine.device, precision, run.peak_tflops)

    def metrics(self, step_seconds: float) -> dict[str, float]:
        if self.peak is None or step_seconds <= 0:
            return {}
        tflops = self.flops_per_step / step_seconds / 1e12
        return {"train/tflops": tflops, "train/mfu_pct": 100 * tflops / self.peak.tflops}


def _precision(engine: Any) -> str:
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"


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

    ``compute_loss(batch)`` returns this rank's scalar loss for one micro batch; DeepSpeed accumulates micro batches
    into optimizer steps. No step reads a device value to the host: losses and non-finite flags are accumulated on
    the device, and the ranks agree (one small all-reduce, then a host read) only at sync steps: report steps (every
    ``log_every``), checkpoint steps, the last step and every ``run.sync_every`` steps. There a preemption signal
    writes a checkpoint and ends the loop, and a non-finite loss is handled as ``run.on_nonfinite`` says: ``stop``
    raises ``FloatingPointError`` naming the first bad step; ``skip`` counts the step, whose update DeepSpeed
    dropped on every rank; ``rollback`` reloads the last complete checkpoint and continues on a fresh data epoch, at
    most ``run.max_rollbacks`` times, then stops as ``stop``. Every report logs loss, LR, TFLOP/s per device and MFU
    (model FLOPs from ``flops``), and the step time split into data wait, forward + backward, optimizer step and
    checkpoint writing. ``run.profile_steps=[a, b]`` writes a torch profiler trace of steps a..b to
    ``<run.output_dir>/profile/``. After a preemption signal's checkpoint in a SLURM job, rank 0 runs ``scontrol
    requeue`` when ``run.slurm_requeue`` asks for it (:mod:`.slurm`).

    ``client_state(step, data_epoch)`` is stored in every checkpoint. ``on_step(step, batch)`` runs after every
    optimizer step; ``on_epoch_end(data_epoch, step)`` after every data epoch that ran to its end (on all ranks
    together: training streams give every rank the same batch count).
    """
    run = run if run is not None else RunConfig()
    device = engine.device
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if run.on_nonfinite == "skip" and not _drops_nonfinite_updates(engine):
        raise ConfigError("run.on_nonfinite=skip needs DeepSpeed to drop updates with non-finite gradients, which "
                          "fp32 without ZeRO and bf16 with check_grad_overflow off do not: set deepspeed.zero_stage "
                          "to 1 or more (and leave bf16.check_grad_overflow on), or use run.on_nonfinite=rollback")
    stop_at = min(total_steps, max_steps) if max_steps else total_steps
    sync_every = run.sync_every
    step = start_step
    global_batch = engine.train_batch_size()
    watch, timer = _LossWatch(device), PhaseTimer(device)
    throughput = _Throughput(engine, flops, run, _precision(engine))
    if throughput.peak is not None:
        tracker.print(f"MFU peak: {throughput.peak.tflops:.4g} TFLOP/s per device ({throughput.peak.source}); "
                      f"{throughput.flops_per_step / 1e12:.4g} model TFLOP per step per device")
    profiler = _Profiler(list(run.profile_steps), Path(run.output_dir) / "profile", rank)
    counts = {"train/nonfinite_steps": 0, "train/nonfinite_skipped": 0, "train/rollbacks": 0}
    window_start, window_steps, lr = time.perf_counter(), 0, 0.0
    reason = "done"
    with _StopFlag() as stop:
        try:
            while step < stop_at:
                loader.set_epoch(data_epoch)
                with _preemption_signals_blocked():
                    batches: Iterable[dict] = iter(loader)
                rolled_back, first_micro = False, True
                while step < stop_at:
                    if first_micro:
                        profiler.begin(step + 1)
                        first_micro = False
                    fetch_start = time.perf_counter()
                    with _preemption_signals_blocked():
                        batch = next(batches, None)
                    timer.add("data", time.perf_counter() - fetch_start)
                    if batch is None:
                        break
                    started = timer.start()
                    loss = watch.micro_batch(compute_loss(batch))
                    engine.backward(loss)
                    timer.stop("fwd_bwd", started)
                    boundary = engine.is_gradient_accumulation_boundary()
                    if boundary:  # the LR this optimizer step applies; engine.step() moves the schedule on
                        lr = max(engine.get_lr())
                    started = timer.start()
                    engine.step()
                    timer.stop("optimizer", started)
                    if not boundary:
                        continue
                    step += 1
                    window_steps += 1
                    first_micro = True
                    watch.end_step(step)
                    profiler.end(step)
                    log = step % log_every == 0 or step == stop_at
                    save = bool(checkpoint_every) and step % checkpoint_every == 0 and step < stop_at
                    if not (log or save or (sync_every and step % sync_every == 0)):
                        if on_step is not None:
                            on_step(step, batch)
                        continue
                    # A sync step: the ranks agree on preemption and non-finite losses, then report.
                    agreed = _agree(watch, stop.stopping, float(getattr(loader, "skipped", 0)), rank, world)
                    watch.reset_flags()
                    if agreed.bad_steps:
                        counts["train/nonfinite_steps"] += agreed.bad_steps
                        if run.on_nonfinite == "stop":
                            raise FloatingPointError(_nonfinite_message(agreed))
                        if run.on_nonfinite == "skip":
                            counts["train/nonfinite_skipped"] += agreed.bad_steps
                            tracker.print(
                                f"non-finite loss in {agreed.bad_steps} step(s) up to step {step}, the first at "
                                f"step {agreed.first_bad} (value {agreed.first_value:.4g} on rank "
                                f"{agreed.first_rank}): their updates were skipped on every rank "
                                f"({counts['train/nonfinite_skipped']} skipped so far)")
                            tracker.send(dict(counts), step)
                        else:
                            point = checkpoints.resume_point(world)
                            if counts["train/rollbacks"] >= run.max_rollbacks or point is None:
                                raise FloatingPointError(_nonfinite_message(agreed))
                            counts["train/rollbacks"] += 1
                            tracker.print(
                                f"non-finite loss at step {agreed.first_bad} (value {agreed.first_value:.4g} on "
                                f"rank {agreed.first_rank}): rolling back to {checkpoints.dir / point.tag} (step "
                                f"{point.step}) and going on with data epoch {data_epoch + 1} (rollback "
                                f"{counts['train/rollbacks']} of at most {run.max_rollbacks})")
                            tracker.send(dict(counts), step)
                            step = checkpoints.load(engine, point).get("step", point.step)
                            watch.reset_losses()
                            timer.read()
                            window_start, window_steps = time.perf_counter(), 0
                            rolled_back = True
                            break
                    preempted = agreed.preempted
                    if log or preempted:
                        elapsed = time.perf_counter() - window_start
                        split = timer.read()
                        grad_norm = engine.get_global_grad_norm()
                        step_seconds = elapsed / window_steps
                        metrics = {
                            "train/loss": agreed.loss_sum / agreed.loss_count if agreed.loss_count else float("nan"),
                            "train/lr": lr,
                            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                            "train/images_per_s": global_batch / step_seconds,
                            **throughput.metrics(step_seconds),
                            "train/step_time_s": step_seconds,
                            **{f"train/time_{phase}_s": seconds / window_steps for phase, seconds in split.items()},
                            "train/peak_memory_mb": peak_memory_mb(),
                            "train/epoch": data_epoch,
                            "train/skipped_samples": int(agreed.skipped_samples),
                            "train/skipped_steps": int(getattr(engine, "skipped_steps", 0)),
                            **counts,
                            "train/eta_min": tracker.eta_seconds(step) / 60,
                        }
                        tracker.log(metrics, step)
                        watch.reset_losses()
                        window_start, window_steps = time.perf_counter(), 0
                    if on_step is not None:
                        on_step(step, batch)
                    if preempted:
                        reason = "preempted"
                        cause = "the deepspeed runner is gone" if stop.launcher_gone else "preemption signal received"
                        tracker.print(f"{cause}: checkpointing at step {step} and stopping")
                        break
                    if save:
                        started = timer.start(device_time=False)
                        checkpoints.save(engine, step, client_state(step, data_epoch))
                        timer.stop("checkpoint", started)
                if batch is None and not rolled_back and on_epoch_end is not None:  # the loader ran dry
                    on_epoch_end(data_epoch, step)
                # A resumed run (or a rollback) starts the next epoch: there is no mid-epoch position to return to,
                # and after a rollback a fresh epoch moves the stream past the stretch that went bad.
                data_epoch += 1
                if reason == "preempted":
                    break
        finally:
            profiler.close()
    if reason != "preempted" and max_steps and step < total_steps:
        reason = "max_steps"
    if step > start_step:  # nothing new to save (a finished run started again): leave its last checkpoint alone
        checkpoints.save(engine, step, client_state(step, data_epoch))
    if reason == "preempted" and stop.signal is not None and rank == 0 and requeue_wanted(run.slurm_requeue):
        tracker.print(requeue_job())  # after the checkpoint: the requeued job resumes from it
    return LoopEnd(step, data_epoch, reason)
