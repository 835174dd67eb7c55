"""Same weights, same numbers as timm's Swin V1/V2 (weights mapped both ways through our loader/exporter).

Weights are randomised with sharp attention (logit scales up to the clamp), which makes float32 itself
uncertain at ~1e-5 for both libraries; so parity is asserted in float64 (tight) and float32 (loose).
Sizes are chosen so that no stage needs padding: timm pads after the cyclic shift, which changes the shift mask
there (docs/models.md, Decisions worth knowing), so padded inputs are compared against our float64 reference in
test_attention instead.
"""

import pytest
import timm
import torch
from conftest import TINY_V1, TINY_V2, randomize_

import swinv2

CASES = [
    # name, overrides (shared by both libraries), input (H, W)
    ("swinv2_tiny_window8_256", {}, (256, 256)),  # the real tiny model
    ("swinv2_tiny_window8_256", dict(img_size=(192, 256), **TINY_V2), (192, 256)),  # non-square, clipped last stage
    ("swinv2_base_window12_192", dict(img_size=(192, 384), **TINY_V2), (192, 384)),  # stage 3 shifts in W only
    ("swinv2_small_window16_256", dict(TINY_V2), (256, 256)),
    ("swinv2_base_window12to16_192to256", dict(TINY_V2), (256, 256)),  # pretrained windows (12, 12, 12, 6)
    ("swinv2_base_window12to24_192to384", dict(TINY_V2), (384, 384)),
    ("swin_tiny_patch4_window7_224", {}, (224, 224)),
    ("swin_base_patch4_window12_384", dict(TINY_V1), (384, 384)),
    ("swin_base_patch4_window7_224", dict(img_size=(224, 448), **TINY_V1), (224, 448)),
]


def _pair(name, overrides):
    ours = randomize_(swinv2.create_model(name, **overrides)).eval()
    ref = timm.create_model(name, pretrained=False, **overrides).eval()
    return ours, ref


def _assert_rel_close(a, b, tol):
    err = (a - b).abs().max() / b.abs().max()
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("name,overrides,size", CASES)
def test_logits_and_features_match_timm(name, overrides, size):
    ours, ref = _pair(name, overrides)
    ref.load_state_dict(swinv2.export_timm_state_dict(ours), strict=True)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        _assert_rel_close(ours(x), ref(x), tol=1e-4)
        ours.double(), ref.double()
        _assert_rel_close(ours.forward_features(x.double()), ref.forward_features(x.double()), tol=1e-9)
        _assert_rel_close(ours(x.double()), ref(x.double()), tol=1e-9)


@pytest.mark.parametrize("name,overrides,size", [CASES[1], CASES[-1]])
def test_timm_weights_load_through_our_loader(name, overrides, size):
    ours, ref = _pair(name, overrides)
    randomize_(ref, seed=1)
    report = swinv2.load_checkpoint(ours, ref.state_dict())
    assert report.layout == "timm" and not report.missing and not report.unexpected
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        _assert_rel_close(ours.double()(x), ref.double()(x), tol=1e-9)


@pytest.mark.parametrize("name", ["swinv2_tiny_window8_256", "swin_tiny_patch4_window7_224"])
def test_gradients_match_timm(name):
    size = 128 if name.startswith("swinv2") else 224  # no padding anywhere (see the module docstring)
    overrides = dict(img_size=size, **(TINY_V2 if name.startswith("swinv2") else TINY_V1))
    ours, ref = _pair(name, overrides)
    ref.load_state_dict(swinv2.export_timm_state_dict(ours))
    ours.double(), ref.double()
    x, target = torch.randn(2, 3, size, size, dtype=torch.float64), torch.tensor([3, 7])
    for model in (ours, ref):
        torch.nn.functional.cross_entropy(model(x), target).backward()
    ref_grads = dict(ref.named_parameters())
    for key, timm_key in zip(ours.state_dict(), swinv2.export_timm_state_dict(ours), strict=True):
        p = dict(ours.named_parameters()).get(key)
        if p is not None:
            _assert_rel_close(p.grad, ref_grads[timm_key].grad, tol=1e-9)
