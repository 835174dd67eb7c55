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
from timm.layers import trunc_normal_
from torch import nn

from .cpu_kernels import NORM_EPS, CPULinear, WindowAttentionFunction, cpu_kernel_applies
from .windows import Size2, log_spaced_coords_table, relative_position_index

# A Python float, not a tensor: a CPU tensor built in forward breaks on GPU and under graph capture.
MAX_LOGIT_SCALE = math.log(100.0)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """The reference: ``dropout(softmax(scale * q k^T + bias)) v``; q, k, v ``(B, nW, nH, N, d)``, bias
    ``(nH, N, N)`` or ``(nW, nH, N, N)``. Keeps every ``(N, N)`` attention map for the backward."""
    attn = (q * scale if scale != 1.0 else q) @ k.transpose(-2, -1) + bias
    return F.dropout(attn.softmax(dim=-1), p=dropout_p, training=dropout_p > 0) @ v


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """The same function through ``scaled_dot_product_attention`` with ``bias`` as its additive ``attn_mask``.

    A per-window bias (shifted blocks) folds the windows into SDPA's head axis, so the ``(nW*nH, N, N)`` bias
    broadcasts over the batch without being copied; otherwise windows fold into the batch axis.
    """
    B, nW, nH, N, d = q.shape
    if bias.dim() == 4:
        shape, mask = (B, nW * nH, N, d), bias.reshape(1, nW * nH, N, N)
    else:
        shape, mask = (B * nW, nH, N, d), bias.unsqueeze(0)
    out = F.scaled_dot_product_attention(
        q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=mask, dropout_p=dropout_p, scale=scale
    )
    return out.view(B, nW, nH, N, d)


class WindowAttention(nn.Module):
    """Shared machinery of V1 and V2 window attention: qkv projection, (chunked) attention, output projection.

    Subclasses define how q and k are scaled and where the relative position bias comes from.
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
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

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
        """``(2wh-1)*(2ww-1)`` rows of per-head biases -> ``(nH, N, N)`` via the relative position index."""
        N = self.window[0] * self.window[1]
        bias = table.reshape(-1, self.num_heads)[self.relative_position_index.view(-1)]
        return bias.view(N, N, self.num_heads).permute(2, 0, 1).contiguous()  # small; spares SDPA a strided mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x ``(B, nW, N, C)`` windows of tokens; mask ``(nW, N, N)`` additive shift mask or None.

        Returns ``(B, nW, N, C)``.
        """
        B, nW, N, C = x.shape
        qkv = self.add_qkv_bias(self.qkv(x))  # (B, nW, N, 3C)
        bias = self.position_bias().to(qkv.dtype)
        if mask is not None:
            bias = mask.to(qkv.dtype).unsqueeze(1) + bias  # (nW, nH, N, N); mask first: contiguous, no copy
        dropout_p = self.attn_drop if self.training else 0.0
        step = self.chunk_size or nW
        if self.cpu_kernels and self._cpu_training(qkv, bias) and self.fused and step >= nW and dropout_p == 0.0:
            heads = WindowAttentionFunction.apply(qkv, bias, self.query_scale(), self.num_heads)
        else:
            q, k, v = qkv.view(B, nW, N, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5).unbind(0)
            q, k, scale = self.scale_qk(q, k)  # each (B, nW, nH, N, d)
            attend = sdpa_attention if self.fused else explicit_attention
            chunks = [
                attend(q[:, i : i + step], k[:, i : i + step], v[:, i : i + step],
                       bias[i : i + step] if bias.dim() == 4 else bias, scale, dropout_p)
                for i in range(0, nW, step)
            ]
            heads = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
        # (B, nW, nH, N, d) -> (B, nW, N, C)
        return self.proj_drop(self.proj(heads.transpose(2, 3).reshape(B, nW, N, C)))

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
    k bias. The CPB MLP maps a log-spaced relative coordinate table to per-head biases; it runs outside autocast
    (in float32 inside a bf16/fp16 autocast region, in the weights' dtype when the model itself was cast).
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
            nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
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
        # tensor. The small factor goes first and contiguous so the product comes out in the (B, nW, nH, N, d)
        # layout that the attention matmuls read without another copy.
        logit_scale = self.query_scale().to(q.dtype)
        q_factor = (logit_scale / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(NORM_EPS)).contiguous()
        k_factor = torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(NORM_EPS).reciprocal().contiguous()
        return q_factor * q, k_factor * k, 1.0

    def query_scale(self) -> torch.Tensor:
        return torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()

    def position_bias(self) -> torch.Tensor:
        # The table is a float32 buffer; DeepSpeed's bf16/fp16 engines cast parameters but not buffers, so the MLP
        # gets its coordinates in its own parameters' dtype (none left after dynamic quantisation: keep float32).
        coords = self.relative_coords_table
        coords = coords.to(next((p.dtype for p in self.cpb_mlp.parameters() if p.is_floating_point()), coords.dtype))
        with torch.autocast(coords.device.type, enabled=False):  # a bias of 16 * sigmoid(.) needs the precision
            table = self.cpb_mlp(coords)
        table = self.gather_bias(table)
        return 16.0 * torch.sigmoid(table.to(torch.promote_types(table.dtype, torch.float32)))
