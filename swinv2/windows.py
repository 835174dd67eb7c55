"""Pure tensor helpers for shifted-window attention.

Swin, arXiv 2103.14030 sec. 3.2; Swin V2, arXiv 2111.09883 sec. 3.3.

Everything here is a function of shapes (and the tensor it is given): no parameters, no state. Layouts are
channels-last, ``(B, H, W, C)``, the layout the blocks work in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

Size2 = tuple[int, int]

# Logit added between tokens from different shift regions (the authors' value): exp(-100) underflows to 0.
SHIFT_MASK_VALUE = -100.0


def to_2tuple(value: int | tuple[int, int] | list[int]) -> Size2:
    """``8 -> (8, 8)``; pairs pass through as a tuple."""
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {value!r}")
    return (int(value[0]), int(value[1]))


def clip_window(feature_size: Size2, window: Size2, shift: Size2) -> tuple[Size2, Size2]:
    """Clip a window to a feature map that is not larger than it, per side (Swin sec. 3.2 / authors' code).

    A side whose feature extent is <= the window gets window = extent and no shift. For square maps this is
    the authors' rule; for non-square maps it matches timm.
    """
    win = tuple(min(f, w) for f, w in zip(feature_size, window, strict=True))
    sft = tuple(0 if f <= w else s for f, w, s in zip(feature_size, win, shift, strict=True))
    return win, sft  # type: ignore[return-value]


def padded_size(size: Size2, window: Size2) -> Size2:
    """Each side rounded up to a multiple of the window."""
    return (math.ceil(size[0] / window[0]) * window[0], math.ceil(size[1] / window[1]) * window[1])


def pad_to_window(x: torch.Tensor, window: Size2) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom/right so both sides are window multiples."""
    _, H, W, _ = x.shape
    Hp, Wp = padded_size((H, W), window)
    if Hp != H or Wp != W:
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    return x


def window_partition(x: torch.Tensor, window: Size2) -> torch.Tensor:
    """``(B, H, W, C) -> (B, nW, wh*ww, C)``, windows in row-major order; H and W must be window multiples."""
    return rearrange(x, "b (nh wh) (nw ww) c -> b (nh nw) (wh ww) c", wh=window[0], ww=window[1])


def window_reverse(windows: torch.Tensor, window: Size2, size: Size2) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, nW, wh*ww, C) -> (B, H, W, C)``."""
    (wh, ww), (H, _) = window, size
    return rearrange(windows, "b (nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=H // wh, wh=wh, ww=ww)


def shift_region_mask(size: Size2, window: Size2, shift: Size2, device=None) -> torch.Tensor:
    """Additive attention mask for shifted windows, ``(nW, N, N)`` with 0 or -100 (Swin sec. 3.2).

    ``size`` is the padded feature size. Tokens are labelled by the 3x3 grid of regions that the cyclic shift
    brings together; pairs from different regions get -100.
    """
    H, W = size
    labels = torch.zeros(H, W, dtype=torch.int64, device=device)
    region = 0
    for hs in (slice(0, H - window[0]), slice(H - window[0], H - shift[0]), slice(H - shift[0], H)):
        for ws in (slice(0, W - window[1]), slice(W - window[1], W - shift[1]), slice(W - shift[1], W)):
            labels[hs, ws] = region
            region += 1
    windows = window_partition(labels.view(1, H, W, 1), window).squeeze(-1).squeeze(0)  # (nW, N)
    different = windows.unsqueeze(1) != windows.unsqueeze(2)
    mask = torch.zeros(different.shape, dtype=torch.float32, device=device)
    return mask.masked_fill_(different, SHIFT_MASK_VALUE)


def relative_position_index(window: Size2, device=None) -> torch.Tensor:
    """``(N, N)`` index into a ``(2wh-1)*(2ww-1)`` table: ``(dy + wh-1) * (2ww-1) + (dx + ww-1)``."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query minus key
    index = (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)
    return index.to(device)


def log_spaced_coords_table(window: Size2, pretrained_window: Size2 | None = None, device=None) -> torch.Tensor:
    """Log-spaced relative coordinates, ``(2wh-1, 2ww-1, 2)`` (Swin V2 sec. 3.3, eq. 4).

    Offsets are divided by ``pretrained_window - 1`` when a pretrained window is given (so a model fine-tuned
    at a larger window sees the coordinates it was trained on, plus extrapolation), else by ``window - 1``;
    then scaled to [-8, 8] and mapped through ``sign(t) * log2(1 + |t|) / log2(8)``. A window side of 1 has
    only the offset 0 and is left undivided.
    """
    wh, ww = window
    dy = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    dx = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)  # (2wh-1, 2ww-1, 2)
    ref = pretrained_window if pretrained_window is not None and min(pretrained_window) > 0 else window
    divisor = torch.tensor([max(ref[0] - 1, 1), max(ref[1] - 1, 1)], dtype=torch.float32)
    table = table / divisor * 8.0
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.to(device)
