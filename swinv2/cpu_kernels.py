"""CPU-only kernels, opt-in with ``create_model(..., cpu_kernels=True)``: a reader of the model can skip this file.

Both compute exactly what the model computes without them, and step aside (to the public path) on a GPU,
under ``torch.compile``, under autocast and in low precision; tests check each against its public path and
against float64.

- :class:`CPULinear`, an ``nn.Linear`` (same parameters and state dict; hooks, LoRA adapters and pruning
  parametrizations see it as one) whose forward runs oneDNN's linear for large float32 layers. On this project's
  CPU, aten's ``addmm``/``mm`` take 1.1-2.3x as long as oneDNN for the model's shapes (``benchmarks/RESULTS.md``).
  ``torch.ao.quantization.quantize_dynamic`` matches module types exactly and so skips it: quantize a model
  built without ``cpu_kernels`` (same state dict).
- :class:`WindowAttentionFunction`, window attention for eager CPU training with a hand-written backward
  (Swin sec. 3.2 / Swin V2 sec. 3.2: per window and head, ``softmax(q' k'^T + B) v`` with ``q' = q / sqrt(d)``,
  ``k' = k`` for V1, or ``q' = s q / |q|``, ``k' = k / |k|`` with the clamped, exponentiated logit scale ``s``
  for V2). The training step on the CPU is bound by memory traffic, and autograd's backward of this chain makes
  many full passes (the normalisation's product and quotient rules separately, a stack of the q/k/v gradients
  and a copy back into the qkv layout) and asks the BLAS for ``q^T dS`` in ``(d, N)`` layout, a batched product
  several times slower than the same numbers computed as ``dS^T q`` in ``(N, d)`` layout. This backward writes
  the qkv gradient once and picks the fast layout for every product. SDPA's CPU kernels give no gradient for
  the bias (which V2 learns through its CPB MLP and V1 through its table): with a learned bias SDPA runs its
  unfused math path on the CPU.

The private torch ops used here (oneDNN's ``mkldnn::_linear_pointwise``; aten's in-place ``_softmax.out`` and
``_softmax_backward_data.out``) are each behind a feature test that runs once, on first use (never at import),
on fixed inputs (no random draw); when it fails, the public op runs instead, with the same values.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .windows import NORM_EPS


def cpu_kernel_applies(x: torch.Tensor) -> bool:
    """Eager work on the CPU in float32/float64 outside autocast: the only case these kernels are for."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


@functools.cache
def onednn_linear_works() -> bool:
    """Whether oneDNN's ``mkldnn::_linear_pointwise`` (private) exists and agrees with ``F.linear``."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w, b = torch.linspace(-1, 1, 12).view(3, 4), torch.linspace(1, -2, 20).view(5, 4), torch.linspace(0, 1, 5)
        return bool(torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-6))
    except (RuntimeError, TypeError):
        return False


# Below about a million outputs addmm's cost is small and oneDNN's per-call set-up (and, in training, a Python
# autograd node) is not: measured on the CPU.
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


class CPULinear(nn.Linear):
    """``nn.Linear`` whose forward runs oneDNN's linear (bias added inside the kernel) for float32 layers of at
    least ``MIN_OUTPUTS`` outputs on the CPU; everywhere else ``nn.Linear.forward``. Same values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.dtype != torch.float32
            or w.dtype != torch.float32
            or not cpu_kernel_applies(x)
            or hasattr(w, "ds_id")  # DeepSpeed ZeRO-3 gathers partitioned weights around its own F.linear
            or x.numel() // x.shape[-1] * self.out_features < MIN_OUTPUTS
            or not onednn_linear_works()
        ):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return _OneDNNLinear.apply(x, w, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")


@functools.cache
def private_softmax_ops_work() -> bool:
    """Whether aten's ``_softmax.out`` / ``_softmax_backward_data.out`` (private ops, used to run the softmax and
    its backward in place) exist and agree with the public ``torch.softmax`` and its derivative.

    Without them the public softmax runs, with the same values; its only cost is a fresh output buffer per call
    (on the CPU a new 25 MB attention map costs thousands of page faults, more than the softmax itself).
    """
    try:
        x = torch.linspace(-3.0, 2.0, 12).view(3, 4)
        g = torch.linspace(1.0, -1.5, 12).view(3, 4)
        probs = torch.softmax(x, -1)
        want_grad = _softmax_backward_public(g, probs)
        got = x.clone()
        torch.ops.aten._softmax.out(got, -1, False, out=got)
        got_grad = g.clone()
        torch.ops.aten._softmax_backward_data.out(got_grad, probs, -1, probs.dtype, grad_input=got_grad)
        return bool(torch.allclose(got, probs) and torch.allclose(got_grad, want_grad))
    except (AttributeError, RuntimeError, TypeError):
        return False


def _softmax_backward_public(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return probs * (grad - (grad * probs).sum(-1, keepdim=True))


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in place when the private op is available."""
    if private_softmax_ops_work():
        return torch.ops.aten._softmax.out(x, -1, False, out=x)
    return torch.softmax(x, -1)


def _softmax_backward(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """d loss / d logits from d loss / d probs, in place into ``grad`` when the private op is available."""
    if private_softmax_ops_work():
        return torch.ops.aten._softmax_backward_data.out(grad, probs, -1, probs.dtype, grad_input=grad)
    return _softmax_backward_public(grad, probs)


def _normalise(t: torch.Tensor, factor: torch.Tensor | float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``factor * t / |t|`` (or ``factor * t`` when ``factor`` is a float), contiguous; and the norm. A vector with
    a norm below eps gets 0, as :func:`swinv2.windows.inverse_norm` gives it."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)  # contiguous in t's logical layout
    if isinstance(factor, float):
        return torch.mul(t, factor, out=out), None
    norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    scale = torch.where(norm > NORM_EPS, norm.clamp_min(NORM_EPS).reciprocal(), 0.0)
    return torch.mul(t, scale if factor is None else scale * factor, out=out), norm


def _normalise_backward(
    grad: torch.Tensor,
    normed: torch.Tensor,
    norm: torch.Tensor | None,
    factor: torch.Tensor | float | None,
    out: torch.Tensor,
    scratch: torch.Tensor,
) -> torch.Tensor | None:
    """Writes d loss / d t into ``out`` (a strided view of the qkv gradient), overwriting ``grad`` and ``scratch``;
    returns the per-row ``sum(grad * normed)`` when the factor is a learned tensor (for its gradient).

    With ``u = t / |t|`` and ``normed = f u``:
    ``d/dt = (f / |t|) (g - u (u . g)) = (f / |t|) (g - normed (normed . g) / f^2)``;
    below eps the output is 0 and so is the gradient.
    """
    if norm is None:  # V1: a constant factor
        torch.mul(grad, factor, out=out)
        return None
    f = 1.0 if factor is None else factor
    dot = torch.mul(grad, normed, out=scratch).sum(-1, keepdim=True)
    coef = dot / (f * f) if factor is not None else dot
    grad.addcmul_(normed, coef, value=-1.0)
    torch.mul(grad, torch.where(norm > NORM_EPS, f / norm.clamp_min(NORM_EPS), 0.0), out=out)
    return dot if factor is not None else None


class WindowAttentionFunction(torch.autograd.Function):
    """``qkv (B, nW, N, 3C)`` -> per-head outputs ``(B, nW, nH, N, d)`` of window attention.

    ``bias`` broadcasts to ``(nW, nH, N, N)``. ``q_scale`` is a tensor for V2 (cosine attention; the clamped,
    exponentiated logit scale, ``(nH, 1, 1)``) or a float for V1 (``d ** -0.5``). Saves the normalised q and k, v and
    the attention probabilities (what autograd would keep) and the q/k norms.
    """

    @staticmethod
    def forward(ctx, qkv, bias, q_scale, num_heads: int):
        B, nW, N, C3 = qkv.shape
        d = C3 // (3 * num_heads)
        q, k, v = qkv.view(B, nW, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5).unbind(0)
        cosine = isinstance(q_scale, torch.Tensor)
        qn, q_norm = _normalise(q, q_scale)
        kn, k_norm = _normalise(k, None if cosine else 1.0)
        v = v.contiguous()
        G = B * nW * num_heads
        logits = torch.bmm(qn.view(G, N, d), kn.view(G, N, d).transpose(1, 2))
        logits.view(B, nW, num_heads, N, N).add_(bias)
        probs = _softmax(logits)
        out = torch.bmm(probs, v.view(G, N, d)).view(B, nW, num_heads, N, d)
        ctx.save_for_backward(qn, kn, v, probs, q_norm, k_norm, q_scale if cosine else None)
        ctx.q_scale = None if cosine else q_scale
        ctx.bias_shape, ctx.qkv_shape = bias.shape, qkv.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        qn, kn, v, probs, q_norm, k_norm, logit_scale = ctx.saved_tensors
        B, nW, nH, N, d = qn.shape
        G = B * nW * nH
        g = grad_out.reshape(G, N, d)
        grad_v = torch.bmm(probs.transpose(1, 2), g)
        grad_logits = _softmax_backward(torch.bmm(g, v.view(G, N, d).transpose(1, 2)), probs)
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = grad_logits.view(B, nW, nH, N, N).sum_to_size(ctx.bias_shape)
        grad_qn = torch.bmm(grad_logits, kn.view(G, N, d)).view(qn.shape)
        grad_kn = torch.bmm(grad_logits.transpose(1, 2), qn.view(G, N, d)).view(kn.shape)  # (N, d): the fast layout
        del grad_logits

        grad_qkv = torch.empty(ctx.qkv_shape, dtype=grad_out.dtype, device=grad_out.device)
        gq, gk, gv = grad_qkv.view(B, nW, N, 3, nH, d).permute(3, 0, 1, 4, 2, 5).unbind(0)
        gv.copy_(grad_v.view(B, nW, nH, N, d))
        scratch = grad_v.view(B, nW, nH, N, d)  # free again: the normalisation backward's products go here
        cosine = logit_scale is not None
        dot = _normalise_backward(grad_qn, qn, q_norm, logit_scale if cosine else ctx.q_scale, gq, scratch)
        _normalise_backward(grad_kn, kn, k_norm, None if cosine else 1.0, gk, scratch)
        grad_scale = None
        if cosine and ctx.needs_input_grad[2]:
            # d qn / d s = u = qn / s, so d loss / d s = sum(grad . qn) / s per head
            grad_scale = dot.sum(dim=(0, 1, 3)).view(nH, 1, 1) / logit_scale
        return grad_qkv, grad_bias, grad_scale, None
