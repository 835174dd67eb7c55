"""Pure tensor helpers for shifted-window attention.

Swin, arXiv 2103.14030 sec. 3.2; Swin V2, arXiv 2111.09883 sec. 3.3.

Everything here is a function of shapes (and the tensor it is given): no parameters, no state. Layouts are
channels-last, ``(B, H, W, C)``, the layout the blocks work in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

Size2 = tuple[int, int]

NORM_EPS = 1e-12  # F.normalize's default

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


class ShiftedGrid(NamedTuple):
    """Where a shifted block's windows lie: ``grid`` windows down and across the padded map, rolled by ``shift``."""

    grid: Size2
    shift: Size2


def border_patterns(window: Size2, shift: Size2, device=None) -> dict[str, torch.Tensor]:
    """The three shift-mask patterns of a shifted layer, ``(N, N)`` bools, True between different regions.

    After the cyclic roll (Swin sec. 3.2) only the windows of the last row and column hold tokens from two regions
    of an axis: rows ``y >= wh - shift_h`` of a last-row window came from the top of the map, columns
    ``x >= ww - shift_w`` of a last-column window from the left. Every other window holds one region. So a shifted
    layer has four masks (interior: none; ``"last_row"``, ``"last_col"``, ``"corner"``) whatever its size, and
    :func:`shift_region_mask` is these patterns laid out per window.
    """
    (wh, ww), (sh, sw) = window, shift
    rows = (torch.arange(wh, device=device) >= wh - sh).repeat_interleave(ww)  # (N,) token came from the top
    cols = (torch.arange(ww, device=device) >= ww - sw).repeat(wh)  # (N,) token came from the left
    row_split, col_split = rows[:, None] != rows[None, :], cols[:, None] != cols[None, :]
    return {"last_row": row_split, "last_col": col_split, "corner": row_split | col_split}


def relative_position_index(window: Size2, device=None) -> torch.Tensor:
    """``(N, N)`` int32 index into a ``(2wh-1)*(2ww-1)`` table: ``(dy + wh-1) * (2ww-1) + (dx + ww-1)``.

    The index is ``a[i] - a[j] + a[N-1]`` with ``a = y * (2ww-1) + x`` per token, so it is one broadcast subtraction.
    """
    wh, ww = window
    a = (torch.arange(wh, device=device)[:, None] * (2 * ww - 1) + torch.arange(ww, device=device)).flatten()
    return (a[:, None] - a[None, :] + a[-1]).to(torch.int32)


def inverse_norm(x: torch.Tensor, numerator: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``numerator / |x|`` over the last axis in ``x``'s dtype, and 0 for a vector whose norm is below ``NORM_EPS``.

    The cosine attention's normalisation (Swin V2 sec. 3.2) as ``F.normalize`` computes it, except that a zero
    vector (a padded key is exactly 0) gets a zero factor and a zero gradient instead of ``1 / eps``: in float16
    ``1e-12`` underflows to 0 and ``0 * inf`` is NaN, and ``1 / eps`` times any gradient overflows. The norm is
    accumulated in at least float32 and the factor kept within the dtype's range.
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    factor = torch.where(norm > NORM_EPS, numerator / norm.clamp_min(NORM_EPS), 0.0)
    if x.dtype == torch.float16:
        factor = factor.clamp_max(torch.finfo(x.dtype).max)
    return factor.to(x.dtype)


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
