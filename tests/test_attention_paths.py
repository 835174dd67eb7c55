"""The GPU's training path (SDPA with the bias as ``attn_mask``), forced on the CPU where SDPA computes the same
function, against the explicit reference path; and the CPU kernel's private softmax ops against their public
fallback."""

import pytest
import torch
from conftest import randomize_
from torch.profiler import ProfilerActivity, profile

import swinv2.cpu_kernels as cpu_kernels
from swinv2.attention import explicit_attention, sdpa_attention
from swinv2.model import SwinBlock

# version, window, shift, feature size (H, W): shifted, padded (6x10 -> 8x12 before the roll), unshifted
BLOCKS = [
    ("v2", (4, 4), (2, 2), (8, 12)),
    ("v2", (4, 4), (2, 2), (6, 10)),
    ("v2", (4, 4), (0, 0), (8, 8)),
    ("v1", (4, 4), (2, 2), (8, 12)),
    ("v1", (4, 4), (2, 2), (7, 9)),
    ("v1", (4, 4), (0, 0), (8, 8)),
]


def _ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


def _outputs_and_grads(block, x, weights):
    x = x.clone().requires_grad_(True)
    y = block(x)
    (y * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("chunk", [None, 2], ids=["whole", "chunked"])
@pytest.mark.parametrize("version,window,shift,size", BLOCKS, ids=[f"{b[0]}-{b[2][0]}-{b[3]}" for b in BLOCKS])
def test_sdpa_training_path_matches_explicit_path(version, window, shift, size, chunk):
    """Outputs and the gradients of the input and every parameter (qkv weight and biases, i.e. q, k and v; the
    CPB MLP, logit_scale, the V1 bias table; the projection), in float64 so a slip shows far above rounding."""
    block = randomize_(SwinBlock(version, 16, 2, window, shift, attn_chunk_size=chunk, cpu_kernels=False))
    block = block.train().double()
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    weights = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view_as(x)
    ops = _ops_run(lambda: _outputs_and_grads(block, x, weights))
    assert "aten::scaled_dot_product_attention" in ops  # the SDPA path really ran
    sdpa = _outputs_and_grads(block, x, weights)
    block.attn.fused = False
    assert "aten::scaled_dot_product_attention" not in _ops_run(lambda: _outputs_and_grads(block, x, weights))
    explicit = _outputs_and_grads(block, x, weights)
    torch.testing.assert_close(sdpa[0], explicit[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sdpa[1], explicit[1], rtol=1e-10, atol=1e-12)
    assert explicit[2].keys() == sdpa[2].keys()
    for name in explicit[2]:
        assert explicit[2][name].abs().max() > 0, name  # every parameter is learned through attention
        torch.testing.assert_close(sdpa[2][name], explicit[2][name], rtol=1e-10, atol=1e-12, msg=name)


def test_sdpa_function_gradients_for_q_k_v_and_bias():
    """The two attention functions on their own: gradients of q, k, v and the shared bias, windows folded into the
    batch."""
    B, nW, nH, N, d = 2, 3, 2, 16, 8
    q, k, v = (torch.randn(B, nW, nH, N, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(nH, N, N, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(B, nW, nH, N, d, dtype=torch.float64)
    results = []
    for attend in (sdpa_attention, explicit_attention):
        out = attend(q, k, v, bias, 0.35)
        results.append((out, *torch.autograd.grad((out * weights).sum(), (q, k, v, bias))))
    for name, got, want in zip(("out", "q", "k", "v", "bias"), *results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.skipif(not cpu_kernels.private_softmax_ops_work(), reason="this torch has no in-place softmax ops")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cpu_kernel_private_softmax_and_public_fallback_agree(version, monkeypatch):
    """The CPU kernel with aten's in-place softmax (private) and with the public softmax it falls back to: same
    outputs and gradients, both close to autograd through the explicit path in float64."""
    block = randomize_(SwinBlock(version, 16, 2, (4, 4), (2, 2), cpu_kernels=True)).train()
    x = torch.randn(2, 8, 8, 16)
    weights = torch.linspace(-1, 1, x.numel()).view_as(x)
    private = _outputs_and_grads(block, x, weights)
    assert "aten::_softmax_backward_data" in _ops_run(lambda: _outputs_and_grads(block, x, weights))
    monkeypatch.setattr(cpu_kernels, "private_softmax_ops_work", lambda: False)
    assert "aten::_softmax_backward_data" not in _ops_run(lambda: _outputs_and_grads(block, x, weights))
    public = _outputs_and_grads(block, x, weights)
    block = block.double()
    block.attn.fused = False
    reference = _outputs_and_grads(block, x.double(), weights.double())
    for got in (private, public):  # float32 against float64: 1e-3 of each gradient's largest entry
        torch.testing.assert_close(got[0].double(), reference[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1].double(), reference[1], rtol=1e-4, atol=1e-5)
        for name, want in reference[2].items():
            tol = 1e-3 * float(want.abs().max())
            torch.testing.assert_close(got[2][name].double(), want, rtol=1e-4, atol=tol, msg=name)
    torch.testing.assert_close(private[0], public[0], rtol=1e-6, atol=1e-6)
    for name, want in public[2].items():  # the two softmax implementations differ by rounding only
        torch.testing.assert_close(private[2][name], want, rtol=1e-5, atol=2e-4 * float(want.abs().max()), msg=name)
