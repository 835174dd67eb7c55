"""The generic step loop shared by pretraining and fine-tuning: step, report, checkpoint, stop cleanly on preemption,
recover from a non-finite loss (:mod:`.nonfinite`); no host-device sync between sync steps. :func:`train_loop`
runs the data epochs, :meth:`_StepLoop.epoch` the optimizer steps of one, :func:`optimizer_step` the micro batches
of one, and :meth:`_StepLoop.sync` what the ranks do together at a sync step (agree, report, stop)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..flops import ImageFlops
from .checkpoint_manager import CheckpointManager
from .config import RunConfig
from .engine import deepspeed_launcher
from .metrics import ReportWindow, Throughput
from .nonfinite import LossWatch, NonFiniteHandler, agree
from .profiling import profile_steps
from .slurm import requeue_job, requeue_wanted
from .throughput import PhaseTimer
from .tracking import Tracker

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: SLURM's --signal=USR1@<seconds> warning
INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports it
CTRL_C_FIRST = ("Ctrl-C: saving a checkpoint at the next sync step (a report step at the latest), then stopping "
                "(press Ctrl-C again to stop at once, losing the steps since the last checkpoint)\n")


@dataclass
class LoopEnd:
    """Where the loop stopped: ``reason`` is ``"done"``, ``"max_steps"``, ``"preempted"`` (a preemption signal or
    the deepspeed runner gone) or ``"interrupted"`` (Ctrl-C)."""

    step: int
    data_epoch: int
    reason: str

    @property
    def exit_status(self) -> int:
        """The command's exit status: 0 (done, max_steps, preempted: a requeued job resumes), 130 (Ctrl-C)."""
        return INTERRUPTED if self.reason == "interrupted" else 0


class _StopFlag:
    """Records a preemption signal; the loop acts on it at the next optimizer-step boundary.

    Also counts as one: the ``deepspeed`` runner going away under a rank started by ``deepspeed.launcher.launch``.
    The runner does not pass SIGTERM on: it dies and leaves ``launch`` and the ranks training unsupervised, so a
    rank whose launcher lost its parent checkpoints and stops as if signalled.

    Ctrl-C (SIGINT, sent by the terminal to every process of the foreground job) counts as one too; a second one
    raises KeyboardInterrupt at once (the command exits 130 without a traceback).
    """

    def __init__(self, rank: int = 0) -> None:
        self.signal: int | None = None  # the first signal received
        self.interrupts = 0
        self.launcher_gone = False
        self.rank = rank
        self._previous: dict[int, Any] = {}
        self._launcher, self._launcher_parent = deepspeed_launcher()

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
        for sig in (*PREEMPTION_SIGNALS, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt("Ctrl-C pressed twice: stopped at once")
            if self.rank == 0:  # every rank gets the terminal's SIGINT; one line says it. os.write: no buffer to
                os.write(2, CTRL_C_FIRST.encode())  # re-enter if the signal came in the middle of a print
        if self.signal is None:
            self.signal = signum

    @property
    def interrupted(self) -> bool:
        """Ctrl-C came first (the deepspeed launcher then passes a SIGTERM on, which changes nothing)."""
        return self.signal == signal.SIGINT

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def optimizer_step(engine: Any, batches: Iterator[dict], compute_loss: Callable[[dict], torch.Tensor],
                   watch: LossWatch, timer: PhaseTimer) -> tuple[dict | None, float]:
    """Micro batches from ``batches`` up to DeepSpeed's accumulation boundary, each a forward + backward and an
    ``engine.step()``; returns the last batch (None: the data ran out first) and the LR the update applied."""
    while True:
        fetch_start = time.perf_counter()
        with _preemption_signals_blocked():
            batch = next(batches, None)
        timer.add("data", time.perf_counter() - fetch_start)
        if batch is None:
            return None, float("nan")
        started = timer.start()
        engine.backward(watch.micro_batch(compute_loss(batch)))
        timer.stop("fwd_bwd", started)
        boundary = engine.is_gradient_accumulation_boundary()
        lr = max(engine.get_lr()) if boundary else 0.0  # read before engine.step() moves the schedule on
        started = timer.start()
        engine.step()
        timer.stop("optimizer", started)
        if boundary:
            return batch, lr


@dataclass
class _Schedule:
    """When the loop stops, syncs and writes checkpoints, and what it calls after steps and epochs."""

    stop_at: int
    log_every: int
    sync_every: int
    checkpoint_every: int
    client_state: Callable[[int, int], dict]
    on_step: Callable[[int, dict], None] | None
    on_epoch_end: Callable[[int, int], None] | None

    def sync_kind(self, step: int) -> tuple[bool, bool, bool]:
        """``(report, checkpoint, sync)`` for optimizer step ``step``."""
        log = step % self.log_every == 0 or step == self.stop_at
        save = bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and step < self.stop_at
        return log, save, log or save or bool(self.sync_every and step % self.sync_every == 0)


class _StepLoop:
    """One invocation's step loop: where it is (step, data epoch, LR) and the parts each step uses."""

    def __init__(self, engine: Any, loader: Any, compute_loss: Callable[[dict], torch.Tensor], schedule: _Schedule,
                 tracker: Tracker, checkpoints: CheckpointManager, nonfinite: NonFiniteHandler, throughput: Throughput,
                 rank: int, world: int):
        self.engine, self.loader, self.compute_loss, self.schedule = engine, loader, compute_loss, schedule
        self.tracker, self.checkpoints, self.nonfinite = tracker, checkpoints, nonfinite
        self.rank, self.world = rank, world
        self.watch, self.timer = LossWatch(engine.device), PhaseTimer(engine.device)
        self.window = ReportWindow(engine, self.timer, throughput)
        self.step = self.data_epoch = 0
        self.lr = 0.0
        self.preempted = False
        self.resumed_at = 0  # the step a resumed run started at, until its first data epoch has begun
        self.stop: _StopFlag | None = None
        self.profiler: Any = None

    def epoch(self) -> None:
        """Optimizer steps over data epoch ``data_epoch`` until it runs dry, the run ends or stops, or rolls back."""
        # A periodic checkpoint stores the epoch it was written in; resumed from one (after a crash), that epoch
        # starts again on a stream salted by the resume step, so its batches are not the ones already trained on.
        self.loader.set_epoch(self.data_epoch, resumed_at=self.resumed_at)
        self.resumed_at = 0
        with _preemption_signals_blocked():
            batches = iter(self.loader)
        schedule = self.schedule
        while self.step < schedule.stop_at:
            with self.profiler.step_range(self.step + 1):
                batch, lr = optimizer_step(self.engine, batches, self.compute_loss, self.watch, self.timer)
            if batch is None:  # the loader ran dry
                if schedule.on_epoch_end is not None:
                    schedule.on_epoch_end(self.data_epoch, self.step)
                return
            self.step, self.lr = self.step + 1, lr
            self.window.step_done()
            self.watch.end_step(self.step)
            self.profiler.step_done(self.step)
            log, save, sync = schedule.sync_kind(self.step)
            if sync and self.sync(log):  # rolled back: go on with a fresh data epoch
                return
            if schedule.on_step is not None:
                schedule.on_step(self.step, batch)
            if self.preempted:
                cause = ("Ctrl-C" if self.stop.interrupted else "the deepspeed runner is gone"
                         if self.stop.launcher_gone else "preemption signal received")
                self.tracker.print(f"{cause}: checkpointing at step {self.step} and stopping")
                return
            if save:
                started = self.timer.start(device_time=False)
                self.checkpoints.save(self.engine, self.step, schedule.client_state(self.step, self.data_epoch))
                self.timer.stop("checkpoint", started)

    def sync(self, log: bool) -> bool:
        """A sync step: the ranks agree on preemption and non-finite losses, then report; True if rolled back."""
        agreed = agree(self.watch, self.stop.stopping, float(getattr(self.loader, "skipped", 0)), self.rank,
                       self.world)
        self.watch.reset_flags()
        back_to = self.nonfinite.handle(agreed, self.engine, self.step, self.data_epoch, self.tracker)
        if back_to is not None:
            self.step = back_to
            self.profiler.rolled_back(back_to)
            self.watch.reset_losses()
            self.timer.read()  # the window starts over: its steps run again
            self.window.restart()
            return True
        self.preempted = agreed.preempted
        if log or self.preempted:
            eta = self.tracker.eta_seconds(self.step)
            metrics = self.window.metrics(agreed, self.lr, self.data_epoch, self.nonfinite.counts, eta)
            self.tracker.log(metrics, self.step)
            self.watch.reset_losses()
            self.window.restart()
        return False


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
    checkpoint_at_end: bool = True,
) -> LoopEnd:
    """Run optimizer steps ``start_step + 1 .. total_steps`` (or ``max_steps``) over ``loader``'s epochs.

    ``compute_loss(batch)`` returns this rank's scalar loss for one micro batch; DeepSpeed accumulates micro batches
    into optimizer steps. No step reads a device value to the host: losses and non-finite flags are accumulated on
    the device, and the ranks agree (one small all-reduce, then a host read) only at sync steps: report steps (every
    ``log_every``), checkpoint steps, the last step and every ``run.sync_every`` steps. There a preemption signal
    writes a checkpoint and ends the loop, and a non-finite loss is handled as ``run.on_nonfinite`` says
    (:class:`.nonfinite.NonFiniteHandler`); a rollback goes on with a fresh data epoch. Every report logs loss, LR,
    TFLOP/s per device and MFU (model FLOPs from ``flops``), and the step time split into data wait, forward +
    backward, optimizer step and checkpoint writing (:mod:`.metrics`). ``run.profile_steps=[a, b]`` writes a torch
    profiler trace of steps a..b to ``<run.output_dir>/profile/`` (:mod:`.profiling`). After a preemption signal's
    checkpoint in a SLURM job, rank 0 runs ``scontrol requeue`` when ``run.slurm_requeue`` asks for it (:mod:`.slurm`).

    The loop ends with a checkpoint (unless ``checkpoint_at_end`` is false and no signal stopped it).
    ``client_state(step, data_epoch)`` is stored in every checkpoint. ``on_step(step, batch)`` runs after every
    optimizer step; ``on_epoch_end(data_epoch, step)`` after every data epoch that ran to its end (on all ranks
    together: training streams give every rank the same batch count).
    """
    run = run if run is not None else RunConfig()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    nonfinite = NonFiniteHandler(run, checkpoints, world)
    nonfinite.check_engine(engine)
    stop_at = min(total_steps, max_steps) if max_steps else total_steps
    schedule = _Schedule(stop_at, log_every, run.sync_every, checkpoint_every, client_state, on_step, on_epoch_end)
    throughput = Throughput(engine, flops, run)
    if throughput.describe() is not None:
        tracker.print(throughput.describe())
    loop = _StepLoop(engine, loader, compute_loss, schedule, tracker, checkpoints, nonfinite, throughput, rank, world)
    loop.step, loop.data_epoch, loop.resumed_at = start_step, data_epoch, start_step
    profile_dir = Path(run.output_dir) / "profile"
    with (_StopFlag(rank) as loop.stop,
          profile_steps(list(run.profile_steps), start_step, profile_dir, rank) as loop.profiler):
        while loop.step < stop_at and not loop.preempted:
            loop.epoch()
            # A stopped run, when resumed, starts the next epoch (there is no mid-epoch position to return to), and
            # after a rollback a fresh epoch moves the stream past the stretch that went bad.
            loop.data_epoch += 1
        step, data_epoch = loop.step, loop.data_epoch
        reason = ("interrupted" if loop.preempted and loop.stop.interrupted else "preempted" if loop.preempted
                  else "max_steps" if max_steps and step < total_steps else "done")
        # A finished run started again has nothing new to save: its last checkpoint is left alone.
        if step > start_step and (checkpoint_at_end or loop.preempted):
            checkpoints.save(engine, step, client_state(step, data_epoch))  # a second Ctrl-C may still stop it
    if reason == "interrupted":
        tracker.print(f"Ctrl-C: stopped at step {step} with a checkpoint; the same command resumes from it")
    if reason == "preempted" and loop.stop.signal is not None and rank == 0 and requeue_wanted(run.slurm_requeue):
        tracker.print(requeue_job())  # after the checkpoint: the requeued job resumes from it
    return LoopEnd(step, data_epoch, reason)
