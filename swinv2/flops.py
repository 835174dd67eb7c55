"""Exact model FLOPs of a forward pass, for model FLOPs utilisation (MFU) and the memory/speed planner.

Counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add of every matmul, convolution and
attention product the forward actually runs), so padding to window multiples, clipped windows, the V2 position-bias
MLP and the SimMIM decoder are all included; norms, softmax and element-wise ops are not (as in the hand count of
the Swin paper, arXiv 2103.14030 sec. 3.2 eq. 1-2). :func:`image_flops` counts on fake tensors (no memory), so it
takes seconds for SwinV2-G at 1536 px. MFU = 3 x forward FLOPs (forward + backward, activation recomputation not
counted) / step time / peak FLOP/s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model import SwinBlock


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass: in total and inside the Swin blocks (what activation checkpointing recomputes)."""

    total: int
    blocks: int


@dataclass(frozen=True)
class ImageFlops:
    """Forward FLOPs as ``per_image * batch + fixed`` (``fixed``: the V2 position-bias MLPs, run once per forward);
    ``block_per_image`` and ``block_fixed`` likewise for the Swin blocks alone."""

    per_image: int
    fixed: int
    block_per_image: int
    block_fixed: int

    def forward(self, batch: int) -> int:
        return self.per_image * batch + self.fixed

    def recompute(self, batch: int) -> int:
        return self.block_per_image * batch + self.block_fixed


def count_flops(model: nn.Module, run: Callable[[nn.Module], Any]) -> tuple[FlopCount, Any]:
    """FLOPs of ``run(model)`` (a forward, e.g. to the loss) and its result."""
    inside = [0]
    with FlopCounterMode(display=False) as counter:
        start: list[int] = []

        def enter(module, args):
            start.append(counter.get_total_flops())

        def leave(module, args, output):
            inside[0] += counter.get_total_flops() - start.pop()

        blocks = [m for m in model.modules() if isinstance(m, SwinBlock)]
        handles = [b.register_forward_pre_hook(enter) for b in blocks]
        handles += [b.register_forward_hook(leave) for b in blocks]
        try:
            result = run(model)
        finally:
            for h in handles:
                h.remove()
    return FlopCount(counter.get_total_flops(), inside[0]), result


def image_flops(build: Callable[[], nn.Module], forward: Callable[[nn.Module, int], Any]) -> ImageFlops:
    """Forward FLOPs per image of the model ``build()`` makes, with ``forward(model, batch)`` running one batch.

    Counted on fake CUDA tensors (no memory, no GPU) at batch 1 and 2; the difference is the per-image part.
    E.g. ``image_flops(lambda: swinv2.create_model(name), lambda m, b: m(torch.empty(b, 3, 256, 256)))``.
    """
    from .train.plan.fake import fake_cuda

    # fork_rng: building the model draws its initial weights; the caller's random stream must not move.
    with torch.random.fork_rng(devices=[]), fake_cuda():
        model = build()
        one, _ = count_flops(model, lambda m: forward(m, 1))
        two, _ = count_flops(model, lambda m: forward(m, 2))
    return ImageFlops(two.total - one.total, 2 * one.total - two.total, two.blocks - one.blocks,
                      2 * one.blocks - two.blocks)
