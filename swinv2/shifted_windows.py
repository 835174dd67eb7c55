"""Cyclic shift + window partition, and its inverse, each as ONE pass over the tensor.

Swin sec. 3.2: a shifted block rolls the map by ``-shift``, cuts it into windows, attends, pastes the windows
back and rolls by ``+shift``. Written as ``torch.roll`` (one copy per rolled axis) plus a partition copy, that is
three full copies on the way in and three on the way out, and as many again in the backward. The rolled,
partitioned tensor is made of a few rectangular blocks of the map (at most 3 per axis: where the roll wraps and
where the wrapped rows share a window), so it is built here by copying those blocks straight into window
layout. The results are the same tensors ``window_partition(torch.roll(x, -shift))`` and
``torch.roll(window_reverse(w), shift)`` give.
"""

from __future__ import annotations

import torch

from .windows import Size2

# (first window, number of windows, first row in the window, end row in the window, first source row)
Piece = tuple[int, int, int, int, int]


def axis_pieces(size: int, window: int, shift: int) -> tuple[Piece, ...]:
    """How the rows ``r`` of the map rolled by ``-shift`` (source row ``(r + shift) % size``) fall into windows.

    Consecutive whole windows with consecutive source rows are merged into one piece.
    """
    cuts = sorted(set(range(0, size + 1, window)) | {size - shift})
    pieces: list[Piece] = []
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        i, y0 = divmod(start, window)
        src = (start + shift) % size
        whole = y0 == 0 and end - start == window
        if pieces and whole:
            pi, pn, py0, py1, psrc = pieces[-1]
            if py0 == 0 and py1 == window and psrc + pn * window == src:
                pieces[-1] = (pi, pn + 1, 0, window, psrc)
                continue
        pieces.append((i, 1, y0, y0 + end - start, src))
    return tuple(pieces)


def _copy(map_: torch.Tensor, win: torch.Tensor, window: Size2, shift: Size2, to_windows: bool) -> None:
    """Copy between ``map_`` ``(B, H, W, *rest)`` and ``win`` viewed as ``(B, nWh, wh, nWw, ww, *rest)``."""
    H, W = map_.shape[1:3]
    rows, cols = axis_pieces(H, window[0], shift[0]), axis_pieces(W, window[1], shift[1])
    for i, n, y0, y1, r in rows:
        ly = y1 - y0
        map_rows = map_[:, r : r + n * ly].unflatten(1, (n, ly))
        win_rows = win[:, i : i + n, y0:y1]
        for j, m, x0, x1, c in cols:
            lx = x1 - x0
            src = map_rows[:, :, :, c : c + m * lx].unflatten(3, (m, lx))
            dst = win_rows[:, :, :, j : j + m, x0:x1]
            if to_windows:
                dst.copy_(src)
            else:
                src.copy_(dst)


def _window_view(win: torch.Tensor, grid: Size2, window: Size2) -> torch.Tensor:
    """Windows ``(B, nW, wh*ww, *rest)`` viewed as ``(B, nWh, wh, nWw, ww, *rest)``."""
    return win.view(win.shape[0], grid[0], grid[1], window[0], window[1], *win.shape[3:]).transpose(2, 3)


def _partition(x: torch.Tensor, window: Size2, shift: Size2) -> torch.Tensor:
    B, H, W = x.shape[:3]
    grid, N = (H // window[0], W // window[1]), window[0] * window[1]
    out = x.new_empty(B, grid[0] * grid[1], N, *x.shape[3:])
    _copy(x, _window_view(out, grid, window), window, shift, to_windows=True)
    return out


def _merge(win: torch.Tensor, window: Size2, shift: Size2, size: Size2) -> torch.Tensor:
    grid = (size[0] // window[0], size[1] // window[1])
    out = win.new_empty(win.shape[0], size[0], size[1], *win.shape[3:])
    _copy(out, _window_view(win, grid, window), window, shift, to_windows=False)
    return out


class _Partition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, window, shift):
        ctx.window, ctx.shift, ctx.size = window, shift, tuple(x.shape[1:3])
        return _partition(x, window, shift)

    @staticmethod
    def backward(ctx, grad):
        return _merge(grad.contiguous(), ctx.window, ctx.shift, ctx.size), None, None


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, win, window, shift, size):
        ctx.window, ctx.shift = window, shift
        return _merge(win, window, shift, size)

    @staticmethod
    def backward(ctx, grad):
        return _partition(grad.contiguous(), ctx.window, ctx.shift), None, None, None


def shifted_partition(x: torch.Tensor, window: Size2, shift: Size2) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, nW, wh*ww, C)``: roll by ``-shift``, then cut into windows (H, W window multiples)."""
    return _Partition.apply(x, window, shift)


def shifted_merge(win: torch.Tensor, window: Size2, shift: Size2, size: Size2) -> torch.Tensor:
    """``(B, nW, wh*ww, C)`` -> ``(B, H, W, C)``: paste the windows back, then roll by ``+shift``."""
    return _Merge.apply(win.contiguous(), window, shift, size)
