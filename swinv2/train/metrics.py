"""What a report of the step loop holds: loss, LR, gradient norm, speed and MFU, the step time split, memory and
the counters, over the steps since the last report."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch

from ..flops import ImageFlops
from .config import RunConfig
from .nonfinite import Agreement
from .throughput import Peak, PhaseTimer, device_peak, step_flops


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on this rank (CUDA), else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def precision(engine: Any) -> str:
    """The engine's training precision: ``bf16``, ``fp16`` or ``fp32``."""
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"


class Throughput:
    """TFLOP/s per device and MFU of the steps since the last report (:mod:`.throughput`)."""

    def __init__(self, engine: Any, flops: ImageFlops | None, run: RunConfig):
        self.flops_per_step = 0
        self.peak: Peak | None = None
        if flops is None:
            return
        micro, accumulation = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
        self.flops_per_step = step_flops(flops, micro, accumulation)
        if torch.distributed.is_initialized():  # ranks sharing a CPU measure its peak together, each its share
            torch.distributed.barrier()
        self.peak = device_peak(engine.device, precision(engine), run.peak_tflops)

    def describe(self) -> str | None:
        """The line that says where the MFU's peak comes from (None without one)."""
        if self.peak is None:
            return None
        return (f"MFU peak: {self.peak.tflops:.4g} TFLOP/s per device ({self.peak.source}); "
                f"{self.flops_per_step / 1e12:.4g} model TFLOP per step per device")

    def metrics(self, step_seconds: float) -> dict[str, float]:
        """``train/tflops`` and ``train/mfu_pct`` for steps of ``step_seconds`` each (none without a peak)."""
        if self.peak is None or step_seconds <= 0:
            return {}
        tflops = self.flops_per_step / step_seconds / 1e12
        return {"train/tflops": tflops, "train/mfu_pct": 100 * tflops / self.peak.tflops}


class ReportWindow:
    """The steps since the last report and their wall time, turned into a report's metrics by :meth:`metrics`."""

    def __init__(self, engine: Any, timer: PhaseTimer, throughput: Throughput):
        self.engine, self.timer, self.throughput = engine, timer, throughput
        self.global_batch = engine.train_batch_size()
        self.restart()

    def restart(self) -> None:
        """Start a new window now (after a report, or a rollback whose steps are run again)."""
        self.started, self.steps = time.perf_counter(), 0

    def step_done(self) -> None:
        """Count one optimizer step."""
        self.steps += 1

    def metrics(self, agreed: Agreement, lr: float, data_epoch: int, counts: dict[str, int],
                eta_seconds: float) -> dict[str, float]:
        """Every metric of a report (all ``train/...``); reads the phase timer, so call once per window."""
        step_seconds = (time.perf_counter() - self.started) / self.steps
        split = self.timer.read()
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "train/loss": agreed.loss,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/images_per_s": self.global_batch / step_seconds,
            **self.throughput.metrics(step_seconds),
            "train/step_time_s": step_seconds,
            **{f"train/time_{phase}_s": seconds / self.steps for phase, seconds in split.items()},
            "train/peak_memory_mb": peak_memory_mb(),
            "train/epoch": data_epoch,
            "train/skipped_samples": int(agreed.skipped_samples),
            "train/skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
            **counts,
            "train/eta_min": eta_seconds / 60,
        }
