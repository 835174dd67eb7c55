"""A torch profiler trace of optimizer steps ``first..last`` (``run.profile_steps``), driven by
``torch.profiler.schedule``: one chrome-trace JSON per rank, each step a ``train_step_<n>`` range in it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerAction

RECORDING = (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)


class StepProfiler:
    """Tells the profiler which optimizer step comes next, so its schedule follows step numbers, not calls.

    The schedule is ``torch.profiler.schedule`` over the steps (one warm-up step before ``first`` when there is
    one), asked about the step about to run. A rollback re-aims it at the step the run goes on with; one that comes
    while the trace is being recorded ends the trace there, so no step is profiled twice, and once saved the
    trace is never started again.
    """

    def __init__(self, first: int, last: int, start_step: int):
        self.first, self.last = max(first, start_step + 1), last
        warmup = 1 if self.first >= 2 else 0
        self._window = torch.profiler.schedule(wait=self.first - 1 - warmup, warmup=warmup,
                                               active=self.last - self.first + 1, repeat=1)
        self._next = start_step + 1  # the optimizer step the profiler's current action is for
        self._done = False  # the trace has been (or is being) saved: never record again
        self._cut = False  # a rollback ended the recording: save what it has at the next call
        self.profile: Any = None  # the torch.profiler.profile this schedule drives

    def schedule(self, _calls: int) -> ProfilerAction:
        """The profiler's schedule (its argument, the count of ``step()`` calls, is not used: steps are)."""
        if self._cut:
            self._cut = False
            return ProfilerAction.RECORD_AND_SAVE
        if self._done:
            return ProfilerAction.NONE
        action = self._window(self._next - 1)  # torch's schedule counts from 0
        warming = self.profile is not None and self.profile.current_action == ProfilerAction.WARMUP
        if action == ProfilerAction.NONE and warming:
            action = ProfilerAction.WARMUP  # a rollback in the warm-up: warm up through the replayed steps
        self._done = action == ProfilerAction.RECORD_AND_SAVE
        return action

    def step_range(self, step: int) -> AbstractContextManager:
        """Around optimizer step ``step``: a ``train_step_<n>`` range while the trace records."""
        if self.profile is not None and self.profile.current_action in RECORDING:
            return torch.profiler.record_function(f"train_step_{step}")
        return nullcontext()

    def step_done(self, step: int) -> None:
        """After optimizer step ``step``."""
        self._next = step + 1
        self.profile.step()

    def rolled_back(self, step: int) -> None:
        """The run goes on after step ``step`` (a checkpoint's) instead of the step it reached."""
        self._next = step + 1
        if self.profile.current_action == ProfilerAction.RECORD:
            self._done = self._cut = True
            self.profile.step()  # RECORD -> RECORD_AND_SAVE: nothing runs in between
        self.profile.step()


class _NoProfiler:
    """``run.profile_steps`` empty (or already behind a resumed run): nothing is profiled."""

    def step_range(self, step: int) -> AbstractContextManager:
        return nullcontext()

    def step_done(self, step: int) -> None:
        pass

    def rolled_back(self, step: int) -> None:
        pass


@contextmanager
def profile_steps(steps: list[int], start_step: int, folder: Path, rank: int) -> Iterator[StepProfiler | _NoProfiler]:
    """Profile optimizer steps ``steps = [first, last]`` of a run starting after ``start_step`` into
    ``folder/trace_steps<first>-<last>_rank<rank>.json`` (written when the last of them ends, or the loop does)."""
    if not steps or steps[1] <= start_step:
        yield _NoProfiler()
        return
    path = folder / f"trace_steps{steps[0]}-{steps[1]}_rank{rank}.json"

    def save(profile: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(path))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = StepProfiler(steps[0], steps[1], start_step)
    with torch.profiler.profile(activities=activities, schedule=profiler.schedule, on_trace_ready=save) as profile:
        profiler.profile = profile
        yield profiler
