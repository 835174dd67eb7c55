"""One fake forward per batch size gives the planner everything batch-dependent: saved activations, the
per-block recompute of activation checkpointing, the largest transient tensor and FLOPs.

Activation bytes are affine in the micro batch (per image, plus a fixed part: position-bias tables, masks), so
batches 1 and 2 determine them exactly for every batch; :meth:`Measured.at` evaluates them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..flops import count_flops, fake_cuda
from ..model import SwinTransformer
from .activations import SavedTensors, count_saved
from .fake import Recipe


@dataclass(frozen=True)
class Affine:
    """``per_image * batch + fixed``."""

    per_image: int
    fixed: int

    def __call__(self, batch: int) -> int:
        return self.per_image * batch + self.fixed

    @staticmethod
    def fit(one: int, two: int) -> Affine:
        return Affine(two - one, 2 * one - two)


@dataclass(frozen=True)
class Measured:
    """Batch-dependent quantities of one model setting (checkpointing and chunk size as built)."""

    params: int
    activations: Affine  # saved for backward through the whole step
    block_peaks: list[Affine]  # per block: what its backward adds on top (recompute + largest saved tensor)
    flops: Affine  # forward FLOPs
    recompute_flops: Affine  # FLOPs inside the blocks (rerun by activation checkpointing)

    def transient(self, batch: int) -> int:
        return max((peak(batch) for peak in self.block_peaks), default=0)


def _set_checkpointing(model: nn.Module, enabled: bool) -> None:
    for swin in model.modules():
        if isinstance(swin, SwinTransformer):
            swin.set_checkpoint_activations(enabled)


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(stage, "checkpoint_activations", False) for swin in model.modules()
               if isinstance(swin, SwinTransformer) for stage in swin.layers)


def measure(recipe: Recipe) -> Measured:
    """Count the recipe's model at batches 1 and 2 on fake tensors (nothing is allocated)."""
    with fake_cuda():
        model = recipe.build()
        checkpointing = _checkpointing(model)
        runs: list[tuple[SavedTensors, SavedTensors]] = []
        flops = []
        for batch in (1, 2):
            count, saved = count_flops(model, lambda m, b=batch: count_saved(m, lambda mm: recipe.loss(mm, b)))
            flops.append(count)
            inside = saved
            if checkpointing:  # what one block holds while it is recomputed in the backward pass
                _set_checkpointing(model, False)
                inside = count_saved(model, lambda mm, b=batch: recipe.loss(mm, b))
                _set_checkpointing(model, True)
            runs.append((saved, inside))
        params = sum(p.numel() for p in model.parameters())
    (one, one_in), (two, two_in) = runs
    peaks = [
        Affine.fit(checkpointing * a + la, checkpointing * b + lb)
        for a, b, la, lb in zip(one_in.blocks, two_in.blocks, one_in.block_largest, two_in.block_largest, strict=True)
    ]
    return Measured(params, Affine.fit(one.total, two.total), peaks,
                    Affine.fit(flops[0].total, flops[1].total), Affine.fit(flops[0].blocks, flops[1].blocks))
