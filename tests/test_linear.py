"""The oneDNN inference linear (bias in the kernel, GELU fused) against a float64 F.linear / F.gelu."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from swinv2.linear import MIN_OUTPUTS, ONEDNN, Mlp, linear

pytestmark = pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")


def _ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_inference_linear_matches_float64_and_runs_onednn(gelu, bias):
    x = torch.randn(4, 256, 64)  # 1024 rows x 1024 outputs: at the size threshold
    w, b = torch.randn(1024, 64) / 8, torch.randn(1024) if bias else None
    assert x.numel() // 64 * 1024 >= MIN_OUTPUTS
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    want = F.gelu(want) if gelu else want
    with torch.inference_mode():
        got = linear(x, w, b, gelu=gelu)
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: linear(x, w, b, gelu=gelu))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_large_training_linear_runs_onednn_forward_and_gives_float64_gradients(bias):
    x = torch.randn(4, 256, 64, requires_grad=True)
    w = (torch.randn(1024, 64) / 8).requires_grad_()
    b = torch.randn(1024, requires_grad=True) if bias else None
    out = linear(x, w, b, gelu=True)
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_OneDNNLinearBackward"  # GELU's input: our node
    weights = torch.randn_like(out)
    params = [x, w] + ([b] if bias else [])
    got = torch.autograd.grad((out * weights).sum(), params)
    ref = [t.detach().double().requires_grad_() for t in params]
    ref_out = F.gelu(F.linear(ref[0], ref[1], ref[2] if bias else None))
    want = torch.autograd.grad((ref_out * weights.double()).sum(), ref)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def test_small_plain_linears_and_training_keep_f_linear():
    x, w, b = torch.randn(8, 16), torch.randn(32, 16), torch.randn(32)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: linear(x, w, b))  # below the threshold
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: linear(x, w, b, gelu=True))  # fusing always pays
    xg = x.clone().requires_grad_()
    out = linear(xg, w, b, gelu=True)
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "AddmmBackward0"  # autograd's own linear
    (grad,) = torch.autograd.grad(out.sum(), xg)
    ref = x.double().requires_grad_()
    (want,) = torch.autograd.grad(F.gelu(F.linear(ref, w.double(), b.double())).sum(), ref)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-5)


def test_mlp_state_dict_matches_timm_mlp_and_output():
    from timm.layers import Mlp as TimmMlp

    ours, theirs = Mlp(16, 64), TimmMlp(16, 64)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_other_dtypes_and_autocast_fall_back_to_f_linear():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(linear(x, w, gelu=True), F.gelu(F.linear(x, w)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x.float(), w.float(), gelu=True).dtype == torch.bfloat16
