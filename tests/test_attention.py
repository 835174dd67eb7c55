"""Window attention against a float64 loop reference, and the fast paths against the explicit one."""

import copy

import pytest
import torch
from conftest import randomize_
from reference import reference_window_attention

from swinv2.model import SwinBlock

CASES = [
    # version, dim, heads, window, shift, pretrained window, feature size (H, W)
    ("v2", 16, 2, (4, 4), (0, 0), None, (8, 8)),
    ("v2", 16, 2, (4, 4), (2, 2), None, (8, 8)),
    ("v2", 16, 2, (4, 4), (2, 2), (3, 3), (8, 8)),  # fine-tuned from a smaller window
    ("v2", 16, 2, (4, 4), (2, 2), None, (6, 10)),  # padded to 8x12 before the roll
    ("v2", 16, 4, (3, 5), (0, 2), None, (3, 10)),  # rectangular window, shift in one direction only
    ("v1", 16, 2, (4, 4), (2, 2), None, (8, 8)),
    ("v1", 16, 2, (4, 4), (2, 2), None, (7, 9)),
]


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["plain", "cpu-kernels"])
@pytest.mark.parametrize("version,dim,heads,window,shift,pretrained,size", CASES)
def test_window_attention_matches_float64_reference(version, dim, heads, window, shift, pretrained, size, cpu_kernels):
    block = SwinBlock(version, dim, heads, window, shift, pretrained_window=pretrained, cpu_kernels=cpu_kernels)
    block = randomize_(block).eval()
    x = torch.randn(2, *size, dim)
    with torch.no_grad():
        got = block.window_attention(x)
    want = reference_window_attention(block, x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _outputs_and_grads(block, x):
    x = x.clone().requires_grad_(True)
    y = block(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("shift", [(0, 0), (2, 2)])
def test_fast_training_path_matches_explicit_autograd_path(version, shift):
    """The hand-written CPU backward (swinv2/cpu_kernels.py) against autograd through the explicit ops, in
    float64 so that any formula slip shows far above rounding."""
    block = randomize_(SwinBlock(version, 16, 2, (4, 4), shift, cpu_kernels=True)).train().double()
    x = torch.randn(2, 8, 12, 16, dtype=torch.float64)
    fast = _outputs_and_grads(block, x)
    block.attn.fused = False
    slow = _outputs_and_grads(block, x)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-10, atol=1e-12)
    for name in fast[2]:
        torch.testing.assert_close(fast[2][name], slow[2][name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["sdpa", "cpu-kernel"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[6]], ids=["v2", "v2-padded", "v2-rect", "v1"])
def test_training_gradients_match_float64_reference(case, cpu_kernels):
    """float32 training-mode gradients (input and every parameter) against autograd through the float64 loop."""
    version, dim, heads, window, shift, pretrained, size = case
    block = SwinBlock(version, dim, heads, window, shift, pretrained_window=pretrained, cpu_kernels=cpu_kernels)
    block = randomize_(block).train()
    x = torch.randn(2, *size, dim, requires_grad=True)
    weights = torch.linspace(-1, 1, x.numel()).view_as(x)
    params = [p for p in block.attn.parameters()]
    got = torch.autograd.grad((block.window_attention(x) * weights).sum(), [x, *params])
    want = torch.autograd.grad((reference_window_attention(block, x) * weights.double()).sum(), [x, *params])
    names = ["input"] + [n for n, _ in block.attn.named_parameters()]
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-4, atol=1e-5 * float(w.abs().max()), msg=name)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_chunked_attention_identical_outputs_and_grads(version):
    # float64: unchunked training takes the hand-written CPU backward, chunks go through SDPA
    block = randomize_(SwinBlock(version, 16, 2, (4, 4), (2, 2), cpu_kernels=True)).train().double()
    x = torch.randn(2, 12, 12, 16, dtype=torch.float64)  # 9 windows: chunks of 4, 4, 1
    whole = _outputs_and_grads(block, x)
    block.attn.chunk_size = 4
    chunked = _outputs_and_grads(block, x)
    torch.testing.assert_close(whole[0], chunked[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(whole[1], chunked[1], rtol=1e-10, atol=1e-12)
    for name in whole[2]:
        torch.testing.assert_close(whole[2][name], chunked[2][name], rtol=1e-10, atol=1e-12, msg=name)


def test_position_bias_follows_weight_updates_through_data():
    """No cache keyed on version counters: an optimizer that writes through ``.data`` (DeepSpeed's) is seen."""
    block = randomize_(SwinBlock("v2", 16, 2, (4, 4), (0, 0))).eval()
    x = torch.randn(1, 4, 4, 16)
    with torch.no_grad():
        before = block(x)
        block.attn.cpb_mlp[2].weight.data.mul_(3.0)
        after = block(x)
    fresh = randomize_(SwinBlock("v2", 16, 2, (4, 4), (0, 0))).eval()
    fresh.load_state_dict(block.state_dict())
    with torch.no_grad():
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, fresh(x), rtol=0, atol=0)


def test_fp16_v2_block_with_padded_windows_is_finite_forward_and_backward():
    """A 14x14 map padded to 16x16 for window 4: the padded keys are exactly 0 (V2 has no k bias), and F.normalize's
    eps of 1e-12 underflows to 0 in fp16, so 0 * inf was NaN in two thirds of the outputs. The fp16 block now
    agrees with the same weights in float32."""
    block = randomize_(SwinBlock("v2", 16, 2, (4, 4), (2, 2))).train()
    x = torch.randn(2, 14, 14, 16)
    want = block(x)
    half = copy.deepcopy(block).half()
    xh = x.half().requires_grad_(True)
    got = half(xh)
    got.float().square().mean().backward()
    assert torch.isfinite(got).all() and torch.isfinite(xh.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in half.parameters())
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_cpb_mlp_computes_in_float32_when_deepspeed_casts_the_weights_to_bf16():
    """DeepSpeed's bf16 engine casts every parameter and adds no autocast: the CPB (Swin V2 sec. 3.3) must still
    compute in float32. Reference: the same bf16-rounded weights in float64."""
    attn = randomize_(SwinBlock("v2", 16, 2, (4, 4), (0, 0))).attn.bfloat16()
    bias = attn.position_bias()
    assert bias.dtype == torch.float32
    fc1, fc2 = attn.cpb_mlp[0], attn.cpb_mlp[2]
    coords = attn.relative_coords_table.double()
    table = torch.relu(coords @ fc1.weight.double().T + fc1.bias.double()) @ fc2.weight.double().T
    want = attn.gather_bias(16 * torch.sigmoid(table))
    torch.testing.assert_close(bias.double(), want, rtol=1e-6, atol=1e-5)


def test_cosine_scaling_under_bf16_autocast_makes_no_float32_copy_of_q_or_k():
    """Under autocast q and k stay bf16 through the cosine normalisation: only the per-token norms and factors are
    float32 (an fp32 factor times q would promote q and k to full-size fp32 tensors and cast them back)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from swinv2.attention import WindowAttentionV2

    class FullSizeFloat32(TorchDispatchMode):
        def __init__(self, numel: int):
            super().__init__()
            self.numel, self.seen = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                    self.seen.append(str(func))
            return out

    attn = WindowAttentionV2(32, 4, (4, 4))
    q, k = torch.randn(2, 3, 4, 16, 8, dtype=torch.bfloat16).unbind(0)  # (nW, nH, N, d)
    with torch.autocast("cpu", dtype=torch.bfloat16), FullSizeFloat32(q.numel()) as mode:
        q_scaled, k_scaled, scale = attn.scale_qk(q, k)
    assert q_scaled.dtype == k_scaled.dtype == torch.bfloat16 and scale == 1.0
    assert mode.seen == []
    expected = (q.double() / q.double().norm(dim=-1, keepdim=True)) * attn.query_scale().double()
    torch.testing.assert_close(q_scaled.double(), expected, rtol=1e-2, atol=1e-2)
