"""Linears through oneDNN on the CPU: bias added in the matmul kernel, GELU fused into it at inference.

``F.linear`` on the CPU runs ``addmm``, which first copies the bias into the output and then accumulates the
product into it: one extra pass over the output, which for the MLP's 4x-wide hidden layer is as slow as the
matmul's own write. oneDNN's linear adds the bias inside the kernel and can apply the exact (erf) GELU to each
output tile while it is still in cache, sparing the separate GELU pass (together about 40 % of the MLP's
first layer at 256 px). Both give the same numbers as ``F.linear`` + ``F.gelu``. Training uses the oneDNN
forward (with autograd's usual backward) for large layers only, and keeps the GELU separate. Everywhere else
(small layers, GPU, low precision, autocast, ``torch.compile``, DeepSpeed ZeRO-3's partitioned weights) this is
plain ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear_available() -> bool:
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:  # a private op: check it still takes these arguments and agrees with F.linear
        x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
        return torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
    except (RuntimeError, TypeError):
        return False


ONEDNN = _onednn_linear_available()


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        ONEDNN
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not hasattr(weight, "ds_id")  # ZeRO-3 gathers and releases it around its own F.linear wrapper
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


# Below about a million outputs addmm's extra pass is cheap and oneDNN's per-call set-up (and, in training, a
# Python autograd node) is not: measured on the CPU.
MIN_OUTPUTS = 1 << 20


class _OneDNNLinear(torch.autograd.Function):
    """Forward through oneDNN; backward is the usual pair of matmuls (and a sum for the bias)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad2d.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = grad2d.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_b = grad2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, followed by the exact GELU when ``gelu``.

    On the CPU in float32 this runs oneDNN's linear for layers of at least ``MIN_OUTPUTS`` outputs, and at
    inference also for every GELU layer, with the GELU fused. In training the GELU stays separate: its backward
    needs the pre-activation.
    """
    if not _use_onednn(x, weight):
        out = F.linear(x, weight, bias)
        return F.gelu(out) if gelu else out
    large = x.numel() // x.shape[-1] * weight.shape[0] >= MIN_OUTPUTS
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        out = _OneDNNLinear.apply(x, weight, bias) if large else F.linear(x, weight, bias)
        return F.gelu(out) if gelu else out
    if gelu or large:
        op, algorithm = ("gelu", "none") if gelu else ("none", "")  # "none": the exact (erf) GELU, not tanh
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, op, [], algorithm)
    return F.linear(x, weight, bias)


class Mlp(nn.Module):
    """Transformer MLP, ``fc2(drop(GELU(fc1(x))))`` then dropout (Swin sec. 3.1), with fc1 and the GELU fused."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(linear(x, self.fc1.weight, self.fc1.bias, gelu=True))
        return self.drop(linear(x, self.fc2.weight, self.fc2.bias))
