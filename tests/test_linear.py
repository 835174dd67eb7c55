"""The oneDNN linear (bias in the kernel, GELU fused) against F.linear / F.gelu, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from swinv2.linear import ONEDNN, Mlp, linear

pytestmark = pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear_in_inference_and_training(gelu, bias):
    x = torch.randn(2, 5, 7, 24)
    w, b = torch.randn(40, 24), torch.randn(40) if bias else None
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    want = F.gelu(want) if gelu else want
    with torch.inference_mode():  # the fused kernel
        torch.testing.assert_close(linear(x, w, b, gelu=gelu).double(), want, rtol=1e-5, atol=1e-5)
    params = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    out = linear(params[0], params[1], params[2] if bias else None, gelu=gelu)  # oneDNN forward, own backward
    node = out.grad_fn.next_functions[0][0] if gelu else out.grad_fn  # the GELU keeps its own autograd node
    assert type(node).__name__ == "_OneDNNLinearBackward"
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), params)
    ref = [t.detach().double().requires_grad_() for t in params]
    ref_out = F.linear(ref[0], ref[1], ref[2] if bias else None)
    ref_out = F.gelu(ref_out) if gelu else ref_out
    for got, want in zip(grads, torch.autograd.grad((ref_out * weights.double()).sum(), ref), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_mlp_state_dict_matches_timm_mlp_and_output():
    from timm.layers import Mlp as TimmMlp

    ours, theirs = Mlp(16, 64), TimmMlp(16, 64)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_other_dtypes_fall_back_to_f_linear():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(linear(x, w), F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x.float(), w.float()).dtype == torch.bfloat16
