"""Model FLOPs utilisation (MFU): model FLOPs per step, the device's peak, and the step time split into phases.

MFU (PaLM, Chowdhery et al., arXiv 2204.02311 app. B) = model FLOPs per second / peak FLOPs per second. Model FLOPs
of a training step are 3 x the forward FLOPs (the backward costs twice the forward: Kaplan et al., arXiv 2001.08361
sec. 2.1) of every image the device processed; the recomputation of activation checkpointing is not counted (that
would be hardware FLOPs). The forward FLOPs come from :mod:`swinv2.flops` (``torch.utils.flop_counter``).

The peak of a GPU is its vendor's dense (no structured sparsity) tensor throughput for the run's precision, looked
up by the device name; fp32 runs use the TF32 tensor peak when TF32 matmuls are on, else the plain FP32 peak.
On the CPU, and on a GPU the table does not know, the peak is measured once with a few large matmuls.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..flops import ImageFlops
from .config import DTYPES
from .engine import tf32_matmuls_on

# Dense peak TFLOP/s per GPU (no sparsity) from the vendors' datasheets: (name pattern, {precision: TFLOP/s}).
# Datasheets list tensor figures "with sparsity" (marked *) beside or instead of dense ones; dense is half of those.
# The first pattern that matches torch.cuda.get_device_name() wins, so specific names come before general ones.
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    # NVIDIA H100 datasheet: SXM FP32 67, TF32 989*, BF16/FP16 1,979*; PCIe 51, 756*, 1,513*; NVL 60, 835*, 1,671*.
    (r"H100.*NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H100.*PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5}),
    (r"H100", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),  # SXM ("NVIDIA H100 80GB HBM3")
    # NVIDIA H200 datasheet: SXM as the H100 SXM; NVL FP32 60, TF32 835*, BF16/FP16 1,671*.
    (r"H200.*NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H200", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),
    # NVIDIA A100 datasheet (SXM and PCIe, 40 and 80 GB): FP32 19.5, TF32 156, BF16/FP16 312.
    (r"A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    # NVIDIA L40S datasheet: FP32 91.6, TF32 183, BF16/FP16 362.05.
    (r"L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05}),
    # NVIDIA L40 datasheet: FP32 90.5, TF32 90.5, BF16/FP16 181.05.
    (r"L40\b", {"fp32": 90.5, "tf32": 90.5, "bf16": 181.05, "fp16": 181.05}),
    # NVIDIA L4 datasheet: FP32 30.3, TF32 120*, BF16/FP16 242*.
    (r"\bL4\b", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    # NVIDIA A40 datasheet: FP32 37.4, TF32 74.8, BF16/FP16 149.7.
    (r"A40\b", {"fp32": 37.4, "tf32": 74.8, "bf16": 149.7, "fp16": 149.7}),
    # NVIDIA A10 datasheet: FP32 31.2, TF32 62.5, BF16/FP16 125. NVIDIA publishes no datasheet for AWS's A10G; the
    # A10's figures are used for it (set run.peak_tflops where a measured or better figure is known).
    (r"A10G?\b", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    # NVIDIA V100 datasheet: SXM2 FP32 15.7, FP16 tensor 125; PCIe 14, 112; V100S 16.4, 130. No BF16 or TF32.
    (r"V100S", {"fp32": 16.4, "tf32": 16.4, "fp16": 130.0}),
    (r"V100.*PCIE", {"fp32": 14.0, "tf32": 14.0, "fp16": 112.0}),
    (r"V100", {"fp32": 15.7, "tf32": 15.7, "fp16": 125.0}),
    # NVIDIA T4 datasheet: FP32 8.1, FP16 mixed precision 65. No BF16 or TF32.
    (r"\bT4\b", {"fp32": 8.1, "tf32": 8.1, "fp16": 65.0}),
    # AMD Instinct MI300X datasheet: FP32 matrix 163.4, TF32 653.7, BF16/FP16 1,307.4 (dense).
    (r"MI300X", {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4}),
]


def table_peak_tflops(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """The datasheet peak of ``device_name`` for ``precision`` (bf16, fp16, fp32), or None if not in the table."""
    key = "tf32" if precision == "fp32" and tf32 else precision
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peaks.get(key)
    return None


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 0, repeats: int = 5) -> float:
    """This device's practical matmul peak: the best of ``repeats`` square matmuls after one warm-up (about 0.1-0.5 s
    on a laptop CPU). Used where no datasheet figure applies (the CPU)."""
    n = size or (8192 if device.type == "cuda" else 1024)
    generator = torch.Generator(device=device).manual_seed(0)  # the run's random stream must not move
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first is the warm-up
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


@dataclass(frozen=True)
class Peak:
    """Peak TFLOP/s per device and where it came from (``config``, ``datasheet: <name>`` or ``measured ...``)."""

    tflops: float
    source: str


def device_peak(device: torch.device, precision: str, override: float = 0.0) -> Peak:
    """The peak for MFU: ``override`` if positive, else the datasheet figure of a known GPU, else measured."""
    if override > 0:
        return Peak(override, "run.peak_tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        value = table_peak_tflops(name, precision, tf32_matmuls_on())
        if value is not None:
            return Peak(value, f"datasheet: {name} {precision}")
    dtype = DTYPES[precision]
    if device.type == "cpu" and precision == "fp16":
        dtype = torch.float32  # the CPU runs fp16 models' matmuls no faster than fp32; measure what it does
    return Peak(measured_matmul_tflops(device, dtype), f"measured: {device.type} {dtype} matmul")


def step_flops(flops: ImageFlops, micro_batch: int, accumulation: int) -> int:
    """Model FLOPs of one optimizer step on one device: 3 x forward FLOPs of each of its ``accumulation`` micro
    batches of ``micro_batch`` images (activation recomputation not counted)."""
    return 3 * flops.forward(micro_batch) * accumulation


PHASES = ("data", "fwd_bwd", "optimizer", "checkpoint")


class PhaseTimer:
    """Seconds spent in each phase of the steps since the last :meth:`read`.

    ``data`` (waiting for the loader) and ``checkpoint`` (writing one) are host time. ``fwd_bwd`` and ``optimizer`` are
    device time: on CUDA a pair of events recorded on the current stream around each phase, read only by
    :meth:`read` (the report step, which synchronises anyway), so timing adds no host-device sync to a step
    (CUDA programming guide, "Events"); on the CPU, where the host runs the kernels, the host clock.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._events: list[tuple[str, Any, Any]] = []

    def start(self, device_time: bool = True) -> Any:
        if self.cuda and device_time:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, phase: str, started: Any) -> None:
        if isinstance(started, float):
            self.seconds[phase] += time.perf_counter() - started
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._events.append((phase, started, end))

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read (waits for the recorded events), then starts over."""
        for phase, start, end in self._events:
            end.synchronize()
            self.seconds[phase] += start.elapsed_time(end) / 1000
        out = dict(self.seconds)
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._events.clear()
        return out
