"""GPUs the planner knows, and the memory it sets aside for what is not a tensor (stated assumptions).

Memory is the capacity ``nvidia-smi`` reports; peak dense throughput is the vendor's figure per GPU
(A100: bf16/fp16 312 TFLOP/s, fp32 19.5; H100 SXM and H200: bf16/fp16 989, fp32 67).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class Gpu:
    """A GPU's memory in bytes and its peak dense FLOP/s per precision."""

    name: str
    memory: int
    peak: dict[str, float]


def _peaks(half: float, fp32: float) -> dict[str, float]:
    return {"bf16": half * 1e12, "fp16": half * 1e12, "fp32": fp32 * 1e12}


GPUS = {
    "a100-40gb": Gpu("a100-40gb", 40960 * MIB, _peaks(312, 19.5)),
    "a100-80gb": Gpu("a100-80gb", 81920 * MIB, _peaks(312, 19.5)),
    "h100-80gb": Gpu("h100-80gb", 81559 * MIB, _peaks(989, 67)),
    "h200": Gpu("h200", 143771 * MIB, _peaks(989, 67)),
}

# Not tensors, yet on the GPU: the CUDA context with cuBLAS/cuDNN workspaces and NCCL's communicators and buffers.
# A stated allowance until the GPU check (benchmarks/plan_gpu_check.py) measures it.
CUDA_CONTEXT_BYTES = 2 * GIB
# PyTorch's caching allocator rounds and fragments: this share of the tensor bytes is added on top.
FRAGMENTATION = 0.05
# Model FLOPs utilisation assumed for the step-time estimate (override with --mfu once measured).
DEFAULT_MFU = 0.4
# Per-GPU bus bandwidth for ZeRO's collectives, in Gbit/s: NVLink within a node (about half of an A100's
# 600 GB/s), one 200 Gbit/s InfiniBand HDR adapter per GPU across nodes.
INTRA_NODE_GBPS = 2400.0
INTER_NODE_GBPS = 200.0


def custom_gpu(memory_gib: float, like: Gpu) -> Gpu:
    """``like`` with another memory size (``--gpu-memory``)."""
    return Gpu(f"{like.name} ({memory_gib:g} GiB)", int(memory_gib * GIB), like.peak)
