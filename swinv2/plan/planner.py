"""Does a training config fit on a GPU, with which settings, and how long will a step take?

Per rank: model states (:mod:`.states`), activations kept for the backward pass plus the largest transient
(:mod:`.measure`), DeepSpeed's communication buffers, and a stated allowance for the CUDA context and the
allocator (:mod:`.gpus`). The step time is the exact model FLOPs (:mod:`swinv2.flops`, 3x the forward, plus the
forward of the blocks again with activation checkpointing) over peak x MFU, plus ZeRO's communication volume
(ZeRO paper, Rajbhandari et al., SC 2020, sec. 7: 2 model sizes per step for ZeRO-0/1/2, 3 for ZeRO-3) over the
interconnect, not overlapped (an upper bound).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..train.config import TrainConfig
from ..train.engine import accumulation_steps
from .gpus import CUDA_CONTEXT_BYTES, DEFAULT_MFU, FRAGMENTATION, INTER_NODE_GBPS, INTRA_NODE_GBPS, Gpu
from .measure import Measured
from .states import BYTES, ModelStates, comm_buffers, refused, uses_bf16_optimizer


@dataclass(frozen=True)
class Cluster:
    """How many GPUs, how they are connected, and the MFU assumed for the step time."""

    gpu: Gpu
    world: int
    gpus_per_node: int = 8
    mfu: float = DEFAULT_MFU
    intra_node_gbps: float = INTRA_NODE_GBPS
    inter_node_gbps: float = INTER_NODE_GBPS

    @property
    def bandwidth(self) -> float:
        """Bytes per second per GPU for collectives (the slowest link the ring crosses)."""
        gbps = self.intra_node_gbps if self.world <= self.gpus_per_node else self.inter_node_gbps
        return gbps * 1e9 / 8


@dataclass
class Plan:
    """One setting's memory per rank and step time; ``per_rank_bytes`` as ``launch/plan.py --json`` prints it."""

    params: int
    micro_batch: int
    accumulation: int
    zero_stage: int
    checkpoint_activations: bool
    attn_chunk_size: int
    per_rank_bytes: dict[str, int]
    host_bytes: int
    fits: bool
    max_micro_batch: int
    step_seconds: float
    compute_seconds: float
    comm_seconds: float
    forward_flops_per_image: int
    gpu_memory: int

    @property
    def margin(self) -> int:
        return self.gpu_memory - self.per_rank_bytes["total"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def per_rank_bytes(states: ModelStates, measured: Measured, comm: int, batch: int) -> dict[str, int]:
    """The memory of one rank at micro batch ``batch``, by kind."""
    activations = measured.activations(batch)
    out = {
        "weights": states.weights,
        "gradients": states.gradients,
        "optimizer": states.optimizer,
        "buffers": states.buffers,
        "activations": activations,
        # DeepSpeed's buckets live through the whole backward pass, next to the recompute and gradients. The
        # BF16_Optimizer's all-reduce copies come after it, once the activations are freed: the larger moment counts.
        "transient": max(measured.transient(batch) + comm, states.reduce_transient - activations),
    }
    tensors = sum(out.values())
    out["allowance"] = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * tensors)
    out["total"] = tensors + out["allowance"]
    return out


def largest_micro_batch(states: ModelStates, measured: Measured, comm: int, memory: int, limit: int = 1 << 16) -> int:
    """The largest micro batch whose total fits in ``memory`` (0: not even one image)."""
    lo, hi = 0, limit
    while lo < hi:  # total grows with the batch
        mid = (lo + hi + 1) // 2
        if per_rank_bytes(states, measured, comm, mid)["total"] <= memory:
            lo = mid
        else:
            hi = mid - 1
    return lo


def step_time(cfg: TrainConfig, measured: Measured, cluster: Cluster, micro_batch: int, accumulation: int
              ) -> tuple[float, float]:
    """Compute and communication seconds of one optimizer step (``accumulation`` micro batches per rank)."""
    ds = cfg.deepspeed
    flops = 3 * measured.flops(micro_batch)
    if cfg.model.checkpoint_activations:
        flops += measured.recompute_flops(micro_batch)
    compute = accumulation * flops / (cluster.gpu.peak[ds.precision] * cluster.mfu)
    # Gradients travel in float32 (our DeepSpeed config sets communication_data_type), weights in the training dtype.
    grad_bytes, weight_bytes = measured.params * 4, measured.params * BYTES[ds.precision]
    if uses_bf16_optimizer(cfg, cluster.world):
        volume = 2 * grad_bytes + weight_bytes  # BF16_Optimizer: all-reduce of the gradients, all-gather of weights
    elif ds.zero_stage == 0:
        volume = 2 * grad_bytes  # all-reduce, once per step
    elif ds.zero_stage == 1:
        volume = grad_bytes + weight_bytes  # reduce-scatter of the gradients + all-gather of the weights, per step
    elif ds.zero_stage == 2:
        volume = accumulation * grad_bytes + weight_bytes  # reduce-scatter per micro batch, all-gather per step
    else:
        volume = accumulation * (2 * weight_bytes + grad_bytes)  # all-gather in forward and backward, reduce-scatter
    world = cluster.world
    comm = volume * (world - 1) / world / cluster.bandwidth if world > 1 else 0.0
    return compute, comm


def make_plan(cfg: TrainConfig, measured: Measured, states: ModelStates, cluster: Cluster) -> Plan:
    """The plan of ``cfg`` as configured (its micro batch, ZeRO stage, checkpointing and chunk size); a setting the
    run refuses at start (bf16 with accumulation under ZeRO-0) does not fit."""
    micro = cfg.data.batch_size
    accumulation = accumulation_steps(cfg.deepspeed.global_batch, micro, cluster.world)  # ConfigError if uneven
    comm = comm_buffers(measured.params, cfg, cluster.world)
    memory = per_rank_bytes(states, measured, comm, micro)
    compute, comm_s = step_time(cfg, measured, cluster, micro, accumulation)
    return Plan(
        params=measured.params, micro_batch=micro, accumulation=accumulation, zero_stage=cfg.deepspeed.zero_stage,
        checkpoint_activations=cfg.model.checkpoint_activations, attn_chunk_size=cfg.model.attn_chunk_size,
        per_rank_bytes=memory, host_bytes=states.host,
        fits=memory["total"] <= cluster.gpu.memory and not refused(cfg, cluster.world),
        max_micro_batch=largest_micro_batch(states, measured, comm, cluster.gpu.memory),
        step_seconds=compute + comm_s, compute_seconds=compute, comm_seconds=comm_s,
        forward_flops_per_image=measured.flops.per_image, gpu_memory=cluster.gpu.memory,
    )
