"""Random block masks for masked image modelling (SimMIM, arXiv 2111.09886 sec. 3.1 and 4.1.2).

SimMIM masks square blocks of ``mask_patch_size`` pixels (32 by default, larger than the model's 4-pixel patch)
at a ratio of 0.6: the image is cut into a grid of mask patches, ``ceil(cells * ratio)`` of them are drawn at
random, and the result is upsampled to the encoder's token grid.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from swinv2.windows import to_2tuple


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}: pass e.g. {name}=32")
    return value


class MaskGenerator:
    """Draws one SimMIM mask per call: a ``(H / model_patch_size, W / model_patch_size)`` int64 tensor of 0/1.

    Exactly ``ceil(cells * mask_ratio)`` of the ``(H / mask_patch_size) * (W / mask_patch_size)`` cells are masked,
    each a full ``mask_patch_size / model_patch_size`` block of tokens (1 = masked). ``input_size`` is an int or an
    ``(H, W)`` pair. The count is computed from the ratio as written in decimal: ``100 * 0.55`` cells gives 55,
    where float arithmetic gives 55.00000000000001 and its ceiling 56 (``36 * 0.6`` gives 22 either way).

    Randomness: by default the global torch RNG, which a ``DataLoader`` seeds differently in each worker (so
    workers do not repeat each other's masks and a run seeded with ``torch.manual_seed`` is reproducible). Pass
    ``generator=`` (a ``torch.Generator``) or ``seed=`` to a call for a mask of its own.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ):
        size = to_2tuple(input_size)
        for side in size:
            _positive_int(side, "input_size")
        _positive_int(mask_patch_size, "mask_patch_size")
        _positive_int(model_patch_size, "model_patch_size")
        if size[0] % mask_patch_size or size[1] % mask_patch_size:
            raise ValueError(
                f"input_size {size[0]}x{size[1]} is not a multiple of mask_patch_size {mask_patch_size}: "
                f"choose an input size whose sides are multiples of {mask_patch_size} (or another mask_patch_size)"
            )
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size {mask_patch_size} is not a multiple of model_patch_size {model_patch_size}: "
                f"choose a mask patch size that is a multiple of {model_patch_size} (e.g. 32)"
            )
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio!r}: pass e.g. 0.6")
        self.input_size = size
        self.mask_patch_size, self.model_patch_size, self.mask_ratio = mask_patch_size, model_patch_size, mask_ratio
        self.grid = (size[0] // mask_patch_size, size[1] // mask_patch_size)  # mask cells per side
        self.scale = mask_patch_size // model_patch_size  # tokens per mask cell, per side
        self.token_size = (self.grid[0] * self.scale, self.grid[1] * self.scale)
        cells = self.grid[0] * self.grid[1]
        # Fraction(repr(r)) is the decimal the user wrote, so the ceiling is not pushed up by float error.
        self.num_masked = math.ceil(Fraction(repr(float(mask_ratio))) * cells)

    def __call__(self, generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """One mask, ``(H / model_patch_size, W / model_patch_size)``, int64 0/1 (1 = masked)."""
        if generator is not None and seed is not None:
            raise ValueError("pass either generator= or seed= to MaskGenerator, not both")
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        gh, gw = self.grid
        chosen = torch.randperm(gh * gw, generator=generator)[: self.num_masked]
        cells = torch.zeros(gh * gw, dtype=torch.int64)
        cells[chosen] = 1
        cells = cells.view(gh, 1, gw, 1).expand(gh, self.scale, gw, self.scale)  # each cell -> a block of tokens
        return cells.reshape(self.token_size)  # a copy: the expand is not viewable

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio}; "
            f"{self.num_masked}/{self.grid[0] * self.grid[1]} cells masked)"
        )
