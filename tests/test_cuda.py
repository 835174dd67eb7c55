"""What only a GPU can show: the SDPA training path on CUDA (memory-efficient kernel, learned bias as
``attn_mask``) in fp32, bf16 and fp16 against the explicit path and float64, and the memory it saves.

Every test here carries the ``cuda`` marker and is skipped, saying so, on a machine without a GPU;
``benchmarks/gpu_check.py`` runs them (``pytest -m cuda``) with the other GPU measurements.
"""

import pytest
import torch
from conftest import randomize_
from torch.nn.attention import SDPBackend, sdpa_kernel

import swinv2
from swinv2.model import SwinBlock
from swinv2.plan.fake import cast_params

pytestmark = pytest.mark.cuda

# version, window, shift, feature size: shifted, padded, unshifted
BLOCKS = [
    ("v2", (8, 8), (4, 4), (16, 24)),
    ("v2", (8, 8), (4, 4), (14, 20)),
    ("v2", (8, 8), (0, 0), (16, 16)),
    ("v1", (7, 7), (3, 3), (14, 21)),
    ("v1", (7, 7), (3, 3), (12, 19)),
]


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """float32 matmuls in float32, so that the fp32 comparisons below measure the attention paths, not TF32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _outputs_and_grads(block, x, weights, dtype):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y = block(x)
    (y.double() * weights).sum().backward()
    grads = {n: p.grad.double().clone() for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    return {"output": y.detach().double(), "input": x.grad.double(), **grads}


@pytest.mark.parametrize("chunk", [None, 2], ids=["whole", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("version,window,shift,size", BLOCKS, ids=[f"{b[0]}-{b[2][0]}-{b[3]}" for b in BLOCKS])
def test_memory_efficient_sdpa_training_matches_float64(version, window, shift, size, dtype, chunk):
    """Forced onto the memory-efficient kernel (an error if it cannot take the learned bias): the output and the
    gradients of the input and of every parameter against the explicit path in float64. fp32: within 1e-4 of
    each tensor's scale. bf16/fp16 (autocast): no further from float64 than the explicit path at the same
    precision (twice its error, plus 1e-3 of the scale for ties near zero)."""
    block = randomize_(SwinBlock(version, 64, 2, window, shift, attn_chunk_size=chunk)).train().cuda()
    x = torch.randn(2, *size, 64, device="cuda")
    weights = torch.linspace(-1, 1, x.numel(), device="cuda", dtype=torch.float64).view_as(x)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        sdpa = _outputs_and_grads(block, x, weights, dtype)
    block.attn.fused = False
    explicit = _outputs_and_grads(block, x, weights, dtype)
    block = block.double()
    want = _outputs_and_grads(block, x.double(), weights, torch.float32)
    for name, w in want.items():
        scale = float(w.abs().max())
        assert scale > 0, name
        if dtype == torch.float32:
            torch.testing.assert_close(sdpa[name], w, rtol=1e-4, atol=1e-4 * scale, msg=name)
        else:
            error, reference_error = (float((got[name] - w).abs().max()) for got in (sdpa, explicit))
            assert error <= 2 * reference_error + 1e-3 * scale, (name, error, reference_error)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_sdpa_training_keeps_no_attention_maps(version):
    """A stage-1-sized block at batch 8: the explicit path keeps a (batch x windows x heads x N x N) map for the
    backward (here 8 x 64 x 4 x 64 x 64 x 4 bytes = 32 MiB) and makes two more in it; SDPA's memory-efficient
    kernel keeps none (its backward still writes one map-sized bias gradient), so its peak is lower by more than
    half a map."""
    block = randomize_(SwinBlock(version, 128, 4, (8, 8), (4, 4))).train().cuda()
    x = torch.randn(8, 64, 64, 128, device="cuda")

    def peak(fused: bool) -> int:
        block.attn.fused = fused
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        block(x).sum().backward()
        block.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    peak(True)  # warm-up
    one_map = 8 * 64 * 4 * 64 * 64 * 4
    assert peak(False) - peak(True) > one_map // 2


@pytest.mark.parametrize("regime", ["cast", "autocast"])
@pytest.mark.parametrize("window", [6, 7, 8, 12, 14, 24], ids=lambda w: f"N{w * w}")
def test_eval_bf16_default_dispatch_matches_float64(window, regime):
    """Evaluation (``no_grad``, bf16) through whatever SDPA kernel PyTorch picks here (with cuDNN > 9.15 on H100,
    cuDNN attention, which training never reaches because the bias needs a gradient), at window lengths N = 36,
    49 and 196 (strides no kernel aligns) and 64, 144, 576, shifted and padded: no further from float64 than the
    explicit path in the same precision. ``cast``: the weights in bf16 as DeepSpeed's bf16 engine runs them;
    ``autocast``: fp32 weights under bf16 autocast. benchmarks/gpu_check.py records which kernel ran."""
    block = randomize_(SwinBlock("v2", 128, 4, (window, window), (window // 2, window // 2))).eval().cuda()
    x = torch.randn(2, 2 * window + 3, 3 * window, 128, device="cuda")
    with torch.no_grad():
        want = block.double()(x.double())
        block = block.float() if regime == "autocast" else cast_params(block.float(), torch.bfloat16).eval()
        inputs = x if regime == "autocast" else x.bfloat16()
        outputs = {}
        for fused in (True, False):
            block.attn.fused = fused
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=regime == "autocast"):
                outputs[fused] = block(inputs).double()
    scale = float(want.abs().max())
    error, reference_error = (float((outputs[f] - want).abs().max()) for f in (True, False))
    assert torch.isfinite(outputs[True]).all()
    assert error <= 2 * reference_error + 1e-3 * scale, (error, reference_error, scale)


@pytest.mark.parametrize("name", ["swinv2_tiny_window8_256", "swin_tiny_patch4_window7_224"])
def test_model_on_cuda_matches_the_cpu(name):
    model = randomize_(swinv2.create_model(name, img_size=128, num_classes=10)).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        want = model.double()(x.double())
        got = model.float().cuda()(x.cuda()).double().cpu()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_bf16_model_weights_train():
    """The model cast to bf16 (DeepSpeed's bf16 mode): a training step runs and gives finite gradients."""
    model = randomize_(swinv2.create_model("swinv2_tiny_window8_256", num_classes=10)).cuda().bfloat16().train()
    x = torch.randn(2, 3, 256, 256, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.cross_entropy(model(x).float(), torch.tensor([1, 2], device="cuda")).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
