"""CPU-only: window attention for eager training on the CPU, with a hand-written backward.

A reader of the model can skip this file: it computes exactly what :class:`swinv2.attention.WindowAttention`
computes on its public path (Swin sec. 3.2 / Swin V2 sec. 3.2: per window and head, ``softmax(q' k'^T + B) v``
with ``q' = q / sqrt(d)``, ``k' = k`` for V1, or ``q' = s q / |q|``, ``k' = k / |k|`` with the clamped,
exponentiated logit scale ``s`` for V2), and the attention module chooses it only in eager CPU training in
float32/float64 with ``cpu_kernels=True`` (the default), no attention dropout and no chunking. Under
``torch.compile``, on a GPU, under autocast or with ``cpu_kernels=False`` the model runs
``scaled_dot_product_attention`` instead; tests check both against each other and against float64.

Why: on the CPU the training step is bound by memory traffic, and autograd's backward of this chain makes many
full passes (the normalisation's product and quotient rules separately, a stack of the q/k/v gradients and a
copy back into the qkv layout) and asks the BLAS for ``q^T dS`` in ``(d, N)`` layout, a batched product several
times slower than the same numbers computed as ``dS^T q`` in ``(N, d)`` layout. This backward writes the qkv
gradient once and picks the fast layout for every product. SDPA's CPU kernels give no gradient for the bias
(which V2 learns through its CPB MLP and V1 through its table), so with a learned bias SDPA falls back to its
unfused math path on the CPU.
"""

from __future__ import annotations

import functools

import torch

NORM_EPS = 1e-12  # F.normalize's default


@functools.cache
def private_softmax_ops_work() -> bool:
    """Whether aten's ``_softmax.out`` / ``_softmax_backward_data.out`` (private ops, used to run the softmax and
    its backward in place) exist and agree with the public ``torch.softmax`` and its derivative.

    Runs once, on first use (never at import), on fixed inputs: no random draw. When False the public path runs
    instead, with the same values (a fresh output buffer per call is its only cost: on the CPU a new 25 MB
    attention map costs thousands of page faults, more than the softmax itself).
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


def cpu_kernel_applies(qkv: torch.Tensor, bias: torch.Tensor) -> bool:
    """Eager training on the CPU in float32/float64 outside autocast: the only case this kernel is for."""
    return (
        qkv.device.type == "cpu"
        and qkv.dtype in (torch.float32, torch.float64)
        and torch.is_grad_enabled()
        and (qkv.requires_grad or bias.requires_grad)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _normalise(t: torch.Tensor, factor: torch.Tensor | float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``factor * t / max(|t|, eps)`` (or ``factor * t`` when ``factor`` is a float), contiguous; and the norm."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)  # contiguous in t's logical layout
    if isinstance(factor, float):
        return torch.mul(t, factor, out=out), None
    norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    scale = norm.clamp_min(NORM_EPS).reciprocal()
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
    below eps the norm is a constant and only the first term remains.
    """
    if norm is None:  # V1: a constant factor
        torch.mul(grad, factor, out=out)
        return None
    f = 1.0 if factor is None else factor
    dot = torch.mul(grad, normed, out=scratch).sum(-1, keepdim=True)
    coef = dot / (f * f) if factor is not None else dot
    grad.addcmul_(normed, coef.masked_fill(norm < NORM_EPS, 0.0), value=-1.0)
    torch.mul(grad, f / norm.clamp_min(NORM_EPS), out=out)
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
