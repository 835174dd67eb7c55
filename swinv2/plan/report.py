"""The planner's answers as text: one plan, the search table, and the sentence for a config that cannot fit."""

from __future__ import annotations

import math

from ..train.config import TrainConfig
from .gpus import CUDA_CONTEXT_BYTES, FRAGMENTATION, GIB
from .planner import Cluster, Plan

KINDS = ("weights", "gradients", "optimizer", "buffers", "activations", "transient", "allowance")
EXPLAIN = {
    "weights": "parameters in the training precision (ZeRO-3: this rank's partition)",
    "gradients": "held after the backward pass (ZeRO-2/3: this rank's partition)",
    "optimizer": "float32 master copy and AdamW moments (ZeRO-1+: this rank's partition)",
    "buffers": "model buffers (shift masks, position indices), ZeRO-3's reduction bucket",
    "activations": "saved for the backward pass of one micro batch",
    "transient": "on top in the backward: one block's recompute and largest tensor, DeepSpeed's buckets",
    "allowance": f"CUDA context and NCCL ({CUDA_CONTEXT_BYTES / GIB:g} GiB) + {FRAGMENTATION:.0%} allocator slack",
}

# Images per second one DataLoader worker delivers: the SimMIM 192 px pipeline on 256 px shards, 495-590 per worker
# by benchmarks/loader_speed.py (benchmarks/RESULTS.md, "Input pipeline speed", a 2-core VM); a GPU host's cores
# differ, so the planner says what it assumed.
LOADER_IMAGES_PER_WORKER = 500.0


def loader_workers(plan: Plan, per_worker: float = LOADER_IMAGES_PER_WORKER) -> tuple[float, int]:
    """``(images/s one GPU trains at the plan's step time, DataLoader workers per GPU that deliver them)``: the step
    time is the model's training FLOPs over the GPU's peak x MFU, plus ZeRO communication."""
    rate = plan.micro_batch * plan.accumulation / plan.step_seconds
    return rate, max(1, math.ceil(rate / per_worker))


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def setting(plan: Plan) -> str:
    chunk = f"chunks of {plan.attn_chunk_size} windows" if plan.attn_chunk_size else "all windows at once"
    return (f"ZeRO-{plan.zero_stage}, checkpointing {'on' if plan.checkpoint_activations else 'off'}, {chunk}, "
            f"micro batch {plan.micro_batch} x {plan.accumulation} accumulation")


def describe(plan: Plan, cluster: Cluster, title: str) -> str:
    """The memory per rank by kind, the verdict, the largest micro batch and the step time."""
    lines = [f"{title}: {plan.params / 1e6:.1f}M parameters, {plan.forward_flops_per_image / 1e9:.1f} GFLOPs per "
             f"image (forward), on {cluster.world} x {cluster.gpu.name} ({gib(cluster.gpu.memory)})",
             f"  {setting(plan)}", "  per rank:"]
    for kind in KINDS:
        lines.append(f"    {kind:<12}{gib(plan.per_rank_bytes[kind]):>12}  {EXPLAIN[kind]}")
    lines.append(f"    {'total':<12}{gib(plan.per_rank_bytes['total']):>12}")
    if plan.host_bytes:
        lines.append(f"    offloaded to CPU RAM: {gib(plan.host_bytes)}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  {verdict}: {gib(abs(plan.margin))} {'to spare' if plan.fits else 'too much'}; largest micro "
                 f"batch that fits: {plan.max_micro_batch}")
    lines.append(f"  step: {plan.step_seconds:.2f} s = {plan.compute_seconds:.2f} s compute (MFU {cluster.mfu:g}) "
                 f"+ {plan.comm_seconds:.2f} s ZeRO communication (not overlapped)")
    rate, workers = loader_workers(plan)
    lines.append(f"  data: {rate:,.0f} images/s per GPU need {workers} DataLoader workers per GPU (data.num_workers) "
                 f"at {LOADER_IMAGES_PER_WORKER:g} images/s each (benchmarks/loader_speed.py; measure your host's)")
    return "\n".join(lines)


def search_table(plans: list[Plan], best: Plan | None) -> str:
    """One line per setting: memory at its micro batch, fits, step time; the fastest fitting one marked."""
    lines = ["ZeRO ckpt chunk  micro  total/rank  fits  step s", "---- ---- -----  -----  ----------  ----  ------"]
    for p in plans:
        mark = "  <- fastest" if p is best else ""
        lines.append(f"{p.zero_stage:>4} {'on' if p.checkpoint_activations else 'off':>4} {p.attn_chunk_size:>5}  "
                     f"{p.micro_batch:>5}  {gib(p.per_rank_bytes['total']):>10}  {'yes' if p.fits else 'no':>4}  "
                     f"{p.step_seconds:>6.2f}{mark}")
    return "\n".join(lines)


def cannot_fit(cfg: TrainConfig, least: Plan, cluster: Cluster) -> str:
    """One sentence: what uses the memory in the least-memory setting, and what to change."""
    m = least.per_rank_bytes
    states = m["weights"] + m["gradients"] + m["optimizer"] + m["buffers"]
    return (f"{cfg.model.name} at {cfg.model.img_size} px does not fit in {gib(cluster.gpu.memory)} per GPU at any "
            f"setting: even with ZeRO-3, activation checkpointing and attention chunks of {least.attn_chunk_size} "
            f"windows one image needs {gib(m['total'])} (model states {gib(states)}, activations "
            f"{gib(m['activations'])}, transient {gib(m['transient'])}, allowance {gib(m['allowance'])}); use GPUs "
            f"with more memory, more GPUs (ZeRO-3 divides the model states among them), "
            f"deepspeed.offload_optimizer=true, or a smaller model.img_size.")
