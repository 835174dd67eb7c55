"""The opt-in CPU kernels (swinv2/cpu_kernels.py): oneDNN linears against float64 and against their public
fallback, and a whole model with ``cpu_kernels=True`` against the same weights without."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_V1, TINY_V2, randomize_
from torch.profiler import ProfilerActivity, profile

import swinv2
import swinv2.cpu_kernels as cpu_kernels
from swinv2.cpu_kernels import MIN_OUTPUTS, CPULinear

needs_onednn = pytest.mark.skipif(not cpu_kernels.onednn_linear_works(), reason="this torch has no oneDNN linear")


def _ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


def _large_layer(bias: bool) -> tuple[CPULinear, torch.Tensor]:
    layer = CPULinear(64, 1024, bias=bias)
    x = torch.randn(4, 256, 64)  # 1024 rows x 1024 outputs: at the size threshold
    assert x.numel() // 64 * 1024 >= MIN_OUTPUTS
    return layer, x


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_large_linear_runs_onednn_and_matches_float64(bias):
    layer, x = _large_layer(bias)
    want = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: layer(x))
        got = layer(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("private", [True, False], ids=["onednn", "public-fallback"])
def test_large_training_linear_gradients_match_float64(private, monkeypatch):
    if not private:
        monkeypatch.setattr(cpu_kernels, "onednn_linear_works", lambda: False)
    layer, x = _large_layer(bias=True)
    x.requires_grad_()
    out = layer(x)
    backward = type(out.grad_fn).__name__
    assert backward == ("_OneDNNLinearBackward" if private else "ViewBackward0")  # oneDNN's node, or addmm's view
    weights = torch.randn_like(out)
    params = [x, layer.weight, layer.bias]
    got = torch.autograd.grad((out * weights).sum(), params)
    ref = [t.detach().double().requires_grad_() for t in params]
    want = torch.autograd.grad((F.linear(*ref) * weights.double()).sum(), ref)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def test_small_layers_low_precision_and_autocast_run_nn_linear():
    layer = CPULinear(16, 32)
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: layer(x))  # below the threshold
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        big, xb = _large_layer(bias=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert big(xb).dtype == torch.bfloat16
        assert big.double()(xb.double()).dtype == torch.float64
    assert CPULinear(4, 5).state_dict().keys() == torch.nn.Linear(4, 5).state_dict().keys()


@needs_onednn
@pytest.mark.parametrize("name,arch", [("swinv2_tiny_window8_256", TINY_V2), ("swin_tiny_patch4_window7_224", TINY_V1)])
def test_model_with_cpu_kernels_matches_the_plain_model(name, arch, monkeypatch):
    """Every linear through oneDNN (threshold lowered to 0) and the attention kernel, against the plain model
    (nn.Linear, SDPA) with the same weights: logits and every gradient."""
    monkeypatch.setattr(cpu_kernels, "MIN_OUTPUTS", 0)
    common = dict(img_size=64, window_size=4, num_classes=10, **arch)
    plain = randomize_(swinv2.create_model(name, **common)).train()
    fast = swinv2.create_model(name, cpu_kernels=True, **common).train()
    fast.load_state_dict(plain.state_dict())
    x, target = torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
    ops = _ops_run(lambda: F.cross_entropy(fast(x), target).backward())
    assert "mkldnn::_linear_pointwise" in ops and "WindowAttentionFunction" in ops
    results = []
    for model in (plain, fast):
        model.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits, target).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    for n, want in results[0][1].items():
        tol = 1e-3 * float(want.abs().max())
        torch.testing.assert_close(results[1][1][n], want, rtol=1e-4, atol=tol, msg=n)


def test_feature_probes_are_lazy_and_draw_no_random_numbers():
    for probe in (cpu_kernels.onednn_linear_works, cpu_kernels.private_softmax_ops_work):
        probe.cache_clear()
        state = torch.random.get_rng_state()
        probe()
        assert torch.equal(state, torch.random.get_rng_state())
