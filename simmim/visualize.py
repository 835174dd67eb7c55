"""Reconstruction grids for looking at SimMIM's predictions (PNG files, ``wandb.Image``)."""

from __future__ import annotations

import numpy as np
import torch

from swinv2.data.config import IMAGENET_MEAN, IMAGENET_STD

# Masked pixels in the "masked input" panel: mid-grey, so the blocks read as removed rather than as black content.
MASK_GREY = 0.5


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(n, 3, H, W)`` in [0, 1] -> ``(n, H, W, 3)`` uint8."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def reconstruction_grid(
    images: torch.Tensor, mask: torch.Tensor, reconstruction: torch.Tensor, max_images: int = 8
) -> np.ndarray:
    """An RGB ``uint8`` array ``(n * H, 4 * W, 3)``, one row per image (n = min(B, max_images)):
    original | masked input | reconstruction with the visible pixels pasted back | raw reconstruction.

    ``images`` and ``reconstruction`` are ImageNet-normalised ``(B, 3, H, W)`` (e.g. ``SimMIM.reconstruct``);
    ``mask`` is ``(B, h, w)`` at token (or pixel) resolution, 1 = masked. Pass the result to
    ``PIL.Image.fromarray(...).save("x.png")`` or ``wandb.Image(...)``.
    """
    if images.dim() != 4 or images.shape[1] != 3 or reconstruction.shape != images.shape:
        raise ValueError(
            f"images {tuple(images.shape)} and reconstruction {tuple(reconstruction.shape)} must both be "
            "(batch, 3, height, width): pass RGB batches of the same shape"
        )
    B, _, H, W = images.shape
    if mask.dim() != 3 or mask.shape[0] != B or H % mask.shape[1] or W % mask.shape[2]:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not fit images {tuple(images.shape)}: pass (batch, h, w) with h and w "
            "dividing the image sides (the MaskGenerator output, stacked)"
        )
    n = min(B, max_images)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    original = images[:n].detach().float().cpu() * std + mean
    predicted = reconstruction[:n].detach().float().cpu() * std + mean
    m = mask[:n].detach().cpu().float()
    m = m.repeat_interleave(H // m.shape[1], dim=1).repeat_interleave(W // m.shape[2], dim=2).unsqueeze(1)
    masked = original * (1 - m) + MASK_GREY * m
    pasted = original * (1 - m) + predicted * m
    panels = [_to_uint8(p) for p in (original, masked, pasted, predicted)]  # each (n, H, W, 3)
    return np.ascontiguousarray(np.concatenate(panels, axis=2).reshape(n * H, 4 * W, 3))
