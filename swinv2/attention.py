"""Window multi-head self-attention: Swin V1 (relative bias table) and Swin V2 (scaled cosine + CPB).

Swin V1: arXiv 2103.14030 sec. 3.2 ("relative position bias"). Swin V2: arXiv 2111.09883 sec. 3.2 (scaled cosine
attention) and sec. 3.3 (log-spaced continuous position bias). The windows of a batch are attended by
``scaled_dot_product_attention`` with the position bias (plus the shift mask) as its additive ``attn_mask``,
for training too: on CUDA its memory-efficient kernel learns the bias without keeping the attention maps.
Windows can be attended in sequential chunks (V2 paper sec. 3.4, "sequential self-attention computation") to
bound the memory of the attention maps. ``fused=False`` runs the explicit reference path instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import CPULinear, WindowAttentionFunction, cpu_kernel_applies
from .layers import trunc_normal_
from .windows import (
    SHIFT_MASK_VALUE,
    ShiftedGrid,
    Size2,
    border_patterns,
    inverse_norm,
    log_spaced_coords_table,
    relative_position_index,
)

# A Python float, not a tensor: a CPU tensor built in forward breaks on GPU and under graph capture.
MAX_LOGIT_SCALE = math.log(100.0)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """The reference: ``dropout(softmax(scale * q k^T + bias)) v``; q, k, v ``(B, nW, nH, N, d)``, bias
    ``(nH, N, N)``. Keeps every ``(N, N)`` attention map for the backward."""
    attn = (q * scale if scale != 1.0 else q) @ k.transpose(-2, -1) + bias
    return F.dropout(attn.softmax(dim=-1), p=dropout_p, training=dropout_p > 0) @ v


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """The same function through ``scaled_dot_product_attention`` with ``bias`` ``(nH, N, N)`` as its additive
    ``attn_mask``, broadcast over the windows (folded into the batch axis) without being copied."""
    B, nW, nH, N, d = q.shape
    shape = (B * nW, nH, N, d)
    out = F.scaled_dot_product_attention(
        q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=bias.unsqueeze(0), dropout_p=dropout_p,
        scale=scale,
    )
    return out.view(B, nW, nH, N, d)


class Float32Linear(nn.Linear):
    """An ``nn.Linear`` that computes in at least float32 whatever dtype its weights were cast to, outside autocast.

    For the CPB MLP (Swin V2 sec. 3.3): its output goes through ``16 * sigmoid``, and DeepSpeed's bf16 and fp16
    engines cast every parameter and add no autocast, so it would otherwise run in 8 bits of mantissa. It is
    ``(2w-1)^2 x 512`` MACs per block: free. The cast happens inside the module's own forward (ZeRO-3 has gathered
    the weights by then; hooks and adapters see an ``nn.Linear``); gradients reach the weights in their dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.weight.dtype), torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        if x.device.type == "meta":  # FLOP counting (swinv2.flops): no autocast there, and none to turn off
            return F.linear(x.to(dtype), self.weight.to(dtype), bias)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype), bias)


class WindowAttention(nn.Module):
    """Shared machinery of V1 and V2 window attention: qkv projection, (chunked) attention, output projection.

    Subclasses define how q and k are scaled and where the relative position bias comes from. A shifted layer's
    windows are attended in four groups (interior, last row, last column, corner; see
    :func:`~swinv2.windows.border_patterns`), each with one ``(nH, N, N)`` bias broadcast over its windows, so no
    per-window ``(nW, nH, N, N)`` mask is ever built.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: Size2,
        qkv_bias: bool,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
        chunk_size: int | None = None,
        cpu_kernels: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}: pick a head count that divides it")
        self.dim, self.num_heads, self.window = dim, num_heads, window
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.fused, self.chunk_size, self.cpu_kernels = fused, chunk_size, cpu_kernels
        linear = CPULinear if cpu_kernels else nn.Linear
        self.qkv = linear(dim, dim * 3, bias=qkv_bias)
        self.proj = linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def add_qkv_bias(self, qkv: torch.Tensor) -> torch.Tensor:
        """V2 adds its learned q and v biases to the projection; V1's bias is the qkv Linear's own."""
        return qkv

    def query_scale(self) -> torch.Tensor | float:
        """V1: the float ``d ** -0.5``; V2: the ``(nH, 1, 1)`` tensor ``exp(min(logit_scale, log 100))``."""
        raise NotImplementedError

    def scale_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """q and k as the attention logits take them, and the scale SDPA still has to apply."""
        raise NotImplementedError

    def position_bias(self) -> torch.Tensor:
        """``(nH, N, N)`` bias added to the attention logits."""
        raise NotImplementedError

    def gather_bias(self, table: torch.Tensor) -> torch.Tensor:
        """``(2wh-1)*(2ww-1)`` rows of per-head biases -> ``(nH, N, N)`` via the relative position index.

        The index is built here, on the table's device, rather than kept per block: at SwinV2-G's window 32 it is
        a 4 MB int32 ``(N, N)`` that only the gather's backward holds.
        """
        N = self.window[0] * self.window[1]
        index = relative_position_index(self.window, table.device)
        bias = table.reshape(-1, self.num_heads)[index.view(-1)]
        return bias.view(N, N, self.num_heads).permute(2, 0, 1).contiguous()  # small; spares SDPA a strided mask

    def forward(self, x: torch.Tensor, shifted: ShiftedGrid | None = None) -> torch.Tensor:
        """x ``(B, nW, N, C)`` windows of tokens; ``shifted`` says how a shifted block's windows lie (None: no mask).

        Returns ``(B, nW, N, C)``.
        """
        B, nW, N, C = x.shape
        qkv = self.add_qkv_bias(self.qkv(x))  # (B, nW, N, 3C)
        bias = self.position_bias().to(qkv.dtype)  # (nH, N, N)
        if shifted is None:
            return self.proj_drop(self.proj(self.attend(qkv, bias)))
        grid = shifted.grid
        patterns = border_patterns(self.window, shifted.shift, qkv.device)
        qkv = qkv.view(B, *grid, N, 3 * C)
        heads = qkv.new_empty(B, *grid, N, C)
        interior, last = slice(0, grid[0] - 1), grid[0] - 1
        inner, right = slice(0, grid[1] - 1), grid[1] - 1
        for rows, cols, pattern in ((interior, inner, None), (interior, right, "last_col"),
                                    (last, inner, "last_row"), (last, right, "corner")):
            where = (slice(None), rows, cols)
            if heads[where].numel() == 0:  # a grid one window wide has no interior
                continue
            group = qkv[where].reshape(B, -1, N, 3 * C)
            mask = bias if pattern is None else bias + patterns[pattern].to(bias.dtype) * SHIFT_MASK_VALUE
            heads[where] = self.attend(group, mask).view_as(heads[where])
        return self.proj_drop(self.proj(heads.view(B, nW, N, C)))

    def attend(self, qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``qkv (B, n, N, 3C)`` windows sharing one ``(nH, N, N)`` bias -> ``(B, n, N, C)``, in chunks of windows."""
        B, nW, N, C3 = qkv.shape
        dropout_p = self.attn_drop if self.training else 0.0
        step = self.chunk_size or nW
        if self.cpu_kernels and self._cpu_training(qkv, bias) and self.fused and step >= nW and dropout_p == 0.0:
            heads = WindowAttentionFunction.apply(qkv, bias, self.query_scale(), self.num_heads)
        else:
            q, k, v = qkv.view(B, nW, N, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5).unbind(0)
            q, k, scale = self.scale_qk(q, k)  # each (B, nW, nH, N, d)
            attend = sdpa_attention if self.fused else explicit_attention
            chunks = [
                attend(q[:, i : i + step], k[:, i : i + step], v[:, i : i + step], bias, scale, dropout_p)
                for i in range(0, nW, step)
            ]
            heads = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
        return heads.transpose(2, 3).reshape(B, nW, N, C3 // 3)  # (B, nW, nH, N, d) -> (B, nW, N, C)

    @staticmethod
    def _cpu_training(qkv: torch.Tensor, bias: torch.Tensor) -> bool:
        return cpu_kernel_applies(qkv) and torch.is_grad_enabled() and (qkv.requires_grad or bias.requires_grad)


class WindowAttentionV1(WindowAttention):
    """Swin V1 attention: ``softmax(q k^T / sqrt(d) + B)`` with B from a learned table (arXiv 2103.14030 sec. 3.2)."""

    def __init__(self, dim: int, num_heads: int, window: Size2, qkv_bias: bool = True, **kwargs):
        super().__init__(dim, num_heads, window, qkv_bias, **kwargs)
        rows = (2 * window[0] - 1) * (2 * window[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def query_scale(self) -> float:
        return self.head_dim**-0.5

    def scale_qk(self, q, k):
        return q, k, self.query_scale()

    def position_bias(self) -> torch.Tensor:
        return self.gather_bias(self.relative_position_bias_table)


class WindowAttentionV2(WindowAttention):
    """Swin V2 attention (arXiv 2111.09883 sec. 3.2-3.3).

    ``cos(q, k) * exp(min(logit_scale, log 100)) + 16 * sigmoid(CPB)``; qkv has learned q and v biases and no
    k bias. The CPB MLP maps a log-spaced relative coordinate table to per-head biases; it computes in at least
    float32 (:class:`Float32Linear`), under autocast and after DeepSpeed casts the weights alike.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: Size2,
        qkv_bias: bool = True,
        pretrained_window: Size2 | None = None,
        **kwargs,
    ):
        super().__init__(dim, num_heads, window, qkv_bias=False, **kwargs)
        self.pretrained_window = pretrained_window
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            Float32Linear(2, 512, bias=True), nn.ReLU(inplace=True), Float32Linear(512, num_heads, bias=False)
        )
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.register_buffer(
            "relative_coords_table", log_spaced_coords_table(window, pretrained_window), persistent=False
        )

    def add_qkv_bias(self, qkv: torch.Tensor) -> torch.Tensor:
        if self.q_bias is None:
            return qkv
        return qkv + torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias)).to(qkv.dtype)

    def scale_qk(self, q, k):
        # F.normalize's x / max(||x||, eps) with the logit scale folded into q's factor: one full pass per
        # tensor. The factors are in q's dtype (under autocast an fp32 factor would promote q and k to fp32 and
        # back); they go first and contiguous so the product comes out in the (B, nW, nH, N, d) layout that the
        # attention matmuls read without another copy.
        q_factor = inverse_norm(q, self.query_scale()).contiguous()
        k_factor = inverse_norm(k).contiguous()
        return q_factor * q, k_factor * k, 1.0

    def query_scale(self) -> torch.Tensor:
        return torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()

    def position_bias(self) -> torch.Tensor:
        # 16 * sigmoid on the small ((2w-1)^2, nH) table, before the gather: the same values and gradients, and
        # no (nH, N, N) sigmoid output kept per block for the backward (12.9 GiB per forward at SwinV2-G 1536/w32).
        # Float32Linear keeps the MLP in float32 when DeepSpeed has cast the weights; after dynamic quantisation
        # the MLP takes the float32 coordinates as they are.
        table = self.cpb_mlp(self.relative_coords_table)
        return self.gather_bias(16.0 * torch.sigmoid(table.to(torch.promote_types(table.dtype, torch.float32))))
