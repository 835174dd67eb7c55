"""SimMIM masks, model, loss and normalised target, each against an independent reference (SimMIM arXiv
2111.09886 sec. 3-4)."""

import math

import pytest
import torch
from conftest import randomize_
from simmim_helpers import TINY, V1, V2, masks, one_thread, tiny_simmim  # noqa: F401 (fixture

import swinv2
from simmim import MaskGenerator, SimMIM
from simmim.model import local_normalize, local_stats

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "input_size, mask_patch, model_patch, ratio, masked, cells, tokens",
    [
        (192, 32, 4, 0.6, 22, 36, (48, 48)),  # the SimMIM setting: ceil(36 * 0.6) = 22 of a 6x6 grid, 48x48 tokens
        (320, 32, 4, 0.55, 55, 100, (80, 80)),  # 100 * 0.55 is 55.00000000000001 in floats: 55, not 56
        ((96, 64), 16, 4, 0.5, 12, 24, (24, 16)),
        (64, 16, 2, 0.75, 12, 16, (32, 32)),
    ],
)
def test_mask_counts_and_full_blocks(input_size, mask_patch, model_patch, ratio, masked, cells, tokens):
    gen = MaskGenerator(input_size, mask_patch, model_patch, ratio)
    scale = mask_patch // model_patch
    for seed in range(5):
        mask = gen(seed=seed)
        assert mask.shape == tokens and not mask.is_floating_point()
        assert set(mask.unique().tolist()) <= {0, 1}
        blocks = mask.view(tokens[0] // scale, scale, tokens[1] // scale, scale).permute(0, 2, 1, 3).flatten(2)
        assert torch.equal(blocks.amin(-1), blocks.amax(-1)), "a mask cell is not one full block"
        assert blocks.numel() // scale**2 == cells and blocks[..., 0].sum() == masked
        assert mask.sum() == masked * scale**2
    assert math.ceil(100 * 0.55) == 56  # the float trap the second case guards against


def test_masks_differ_between_draws_and_repeat_per_seed():
    gen = MaskGenerator()
    draws = {tuple(gen().flatten().tolist()) for _ in range(20)}
    assert len(draws) == 20  # C(36, 22) ~ 5.6e9 possible masks: a repeat means the RNG is not advancing
    assert torch.equal(gen(seed=3), gen(seed=3))
    assert torch.equal(gen(seed=3), gen(generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(gen(seed=3), gen(seed=4))
    torch.manual_seed(7)
    first = gen()
    torch.manual_seed(7)
    assert torch.equal(gen(), first)  # the global RNG path is reproducible too (DataLoader workers seed it)
    with pytest.raises(ValueError, match="not both"):
        gen(seed=1, generator=torch.Generator())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_size=200), r"input_size 200x200 is not a multiple of mask_patch_size 32"),
        (dict(input_size=(192, 100)), r"input_size 192x100 is not a multiple of mask_patch_size 32"),
        (dict(input_size=180, mask_patch_size=30), r"mask_patch_size 30 is not a multiple of model_patch_size 4"),
        (dict(mask_ratio=0.0), r"mask_ratio .* got 0.0"),
        (dict(mask_ratio=1.0), r"mask_ratio .* got 1.0"),
        (dict(mask_ratio=1.5), r"mask_ratio .* got 1.5"),
        (dict(mask_patch_size=0), r"mask_patch_size must be a positive integer"),
    ],
)
def test_mask_generator_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskGenerator(**kwargs)


# ---------------------------------------------------------------- model and loss


def reference_reconstruction(model, images, mask):
    """Float64 decoder by hand: 1x1 conv as a matrix product, pixel shuffle as out channel c*s*s + di*s + dj."""
    enc, s = model.encoder, model.stride
    with torch.no_grad():
        features = enc.forward_tokens(enc.embed(images, mask, model.mask_token)).double()  # (B, h, w, C)
    conv = model.decoder[0]
    out = features @ conv.weight.double().flatten(1).t() + conv.bias.double()  # (B, h, w, 3*s*s)
    B, h, w, _ = out.shape
    return out.view(B, h, w, 3, s, s).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, h * s, w * s)


def reference_loss(target, pred, mask, patch):
    """Float64 L1 over masked pixels, pixel mask by index arithmetic: pixel (y, x) belongs to token (y//p, x//p)."""
    H, W = target.shape[-2:]
    rows, cols = torch.arange(H) // patch, torch.arange(W) // patch
    m = mask.double()[:, rows][:, :, cols]  # (B, H, W)
    per_pixel = (target.double() - pred.double()).abs().sum(1)  # summed over channels
    return (per_pixel * m).sum() / (m.sum() + 1e-5) / 3


@pytest.mark.parametrize("name, size", [(V2, (64, 64)), (V2, (64, 96)), (V1, (64, 96))])
def test_reconstruction_and_loss_match_float64(name, size):
    model = tiny_simmim(name)
    images, mask = torch.randn(2, 3, *size), masks(size, 2)
    pred = model.reconstruct(images, mask)
    assert pred.shape == images.shape
    torch.testing.assert_close(pred.double(), reference_reconstruction(model, images, mask), rtol=1e-5, atol=1e-5)
    loss = model(images, mask)
    assert loss.dim() == 0
    torch.testing.assert_close(loss.double(), reference_loss(images, pred, mask, 4), rtol=1e-6, atol=1e-7)


def test_visible_pixels_get_zero_gradient():
    model = tiny_simmim()
    images, mask = torch.randn(2, 3, 64, 64), masks(64, 2)
    seen = []

    def keep(module, args, out):
        out.retain_grad()
        seen.append(out)

    model.decoder.register_forward_hook(keep)
    model(images, mask).backward()
    grad = seen[0].grad  # d loss / d prediction, (B, 3, H, W)
    pixel = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(grad).bool()
    assert torch.count_nonzero(grad[~pixel]) == 0
    # d|t - p|/dp = -sign(t - p), divided by (masked pixels + 1e-5) and by 3 channels
    masked_pixels = pixel[:, 0].sum().item()
    torch.testing.assert_close(grad[pixel].abs(), torch.full_like(grad[pixel], 1 / (masked_pixels + 1e-5) / 3))
    assert model.mask_token.grad.abs().sum() > 0


def test_mask_token_replaces_exactly_the_masked_tokens_before_the_position_embedding():
    model = tiny_simmim(ape=True)
    images, mask = torch.randn(2, 3, 64, 64), masks(64, 2)
    captured = []
    model.encoder.layers[0].register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    with torch.no_grad():
        loss = model(images, mask)
        patches = model.encoder.patch_embed(images)  # (B, 16, 16, C)
        pos = model.encoder.absolute_pos_embed.view(1, 16, 16, -1)
        token = model.mask_token.view(-1)
        want = torch.where(mask[..., None].bool(), token, patches) + pos
        torch.testing.assert_close(captured[0], want, rtol=0, atol=1e-6)
        # the encoder never sees masked pixels: changing them changes the target only, not the tokens
        pixel = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).bool()
        model(torch.where(pixel, torch.randn_like(images), images), mask)
    torch.testing.assert_close(captured[1], captured[0], rtol=0, atol=0)
    assert torch.isfinite(loss)


def loop_normalize(x, k):
    """Per-pixel float64 loop: mean/var over the k x k window cells inside the image (padding not counted)."""
    out = torch.empty_like(x, dtype=torch.float64)
    B, C, H, W = x.shape
    r = k // 2
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    cells = x[b, c, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].double().flatten().tolist()
                    n = len(cells)
                    mean = sum(cells) / n
                    var = max((sum(v * v for v in cells) / n - mean * mean) * n / (n - 1), 0.0)
                    out[b, c, i, j] = (float(x[b, c, i, j]) - mean) / math.sqrt(var + 1e-6)
    return out


def test_normalised_target_matches_a_per_pixel_loop_including_borders():
    x = torch.randn(2, 2, 9, 11, dtype=torch.float64)
    x[0, 0, :6, :6] = 0.5  # windows wholly inside this block have zero variance: target exactly 0
    want = loop_normalize(x, 5)
    torch.testing.assert_close(local_normalize(x, 5), want, rtol=0, atol=1e-9)
    assert torch.all(local_normalize(x, 5)[0, 0, :4, :4] == 0)
    torch.testing.assert_close(local_normalize(x.float(), 5).double(), want, rtol=0, atol=2e-4)
    # float32 rounding makes E[x^2] - mean^2 slightly negative on flat regions: the clamp keeps the target finite
    flat = local_normalize(torch.full((1, 1, 12, 12), 37.3), 5)
    assert torch.isfinite(flat).all() and flat.abs().max() < 1e-2
    # a window larger than the image: every pixel's statistics are over the cells inside the image
    torch.testing.assert_close(local_normalize(x, 47), loop_normalize(x, 47), rtol=0, atol=1e-9)


def test_loss_with_normalised_target():
    model = tiny_simmim(norm_target=47)
    images, mask = torch.randn(2, 3, 64, 64), masks(64, 2)
    with torch.no_grad():
        raw = model.reconstruct(images, mask, target_space=True)
        target = local_normalize(images.double(), 47)
        torch.testing.assert_close(model.target(images).double(), target, rtol=0, atol=1e-4)
        want = reference_loss(target, raw, mask, 4)
        torch.testing.assert_close(model(images, mask).double(), want, rtol=1e-5, atol=0)
        # the default reconstruction is mapped back to the input space: re-normalising it gives the raw prediction
        shown = model.reconstruct(images, mask).double()
        mean, std = local_stats(images.double(), 47)  # checked against the loop through local_normalize
        torch.testing.assert_close(shown, raw.double() * std + mean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm_target", [None, 15])
def test_bf16_model_builds_its_target_from_float32_images(norm_target):
    """DeepSpeed's bf16 casts the weights and adds no autocast. Given float32 images, a bf16 SimMIM rounds only the
    encoder's copy: its loss is the float64 L1 between its own (bf16) prediction and the target of the float32
    images, not of their bf16 rounding (which would move the target by up to 2^-9 relative per pixel)."""
    model = tiny_simmim(norm_target=norm_target).bfloat16()
    images, mask = torch.randn(2, 3, 64, 64), masks(64, 2)
    with torch.no_grad():
        raw = model.reconstruct(images, mask, target_space=True)
        assert raw.dtype == torch.bfloat16  # the encoder and decoder ran in bf16
        torch.testing.assert_close(raw, model.reconstruct(images.bfloat16(), mask, target_space=True), rtol=0, atol=0)
        exact = images.double() if norm_target is None else local_normalize(images.double(), norm_target)
        rounded = images.bfloat16().double()
        rounded = rounded if norm_target is None else local_normalize(rounded, norm_target)
        loss = model(images, mask).double()
    want, bf16_target = reference_loss(exact, raw, mask, 4), reference_loss(rounded, raw, mask, 4)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    assert abs(float(loss - bf16_target)) > 20 * abs(float(loss - want))  # the test tells the two apart


def test_decoder_stride_follows_the_encoder():
    for depths, stride in [((1, 1, 1), 16), ((1, 1), 8)]:
        heads = (1, 2, 4)[: len(depths)]
        encoder = swinv2.create_model(V2, **{**TINY, "img_size": 32, "depths": depths, "num_heads": heads})
        model = SimMIM(encoder)
        assert model.stride == stride
        assert model.decoder[0].out_channels == 3 * stride**2 and model.decoder[0].in_channels == encoder.num_features
        images, mask = torch.randn(1, 3, 32, 48), masks((32, 48), 1)
        assert model.reconstruct(images, mask).shape == images.shape


def test_mask_token_init_and_authors_shape():
    model = SimMIM(swinv2.create_model(V2, **TINY))
    assert model.mask_token.shape == (1, 1, 16)
    assert 0 < model.mask_token.abs().max() <= 0.1  # std 0.02: 5 std would be a wrong init scale


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: SimMIM(swinv2.create_model(V2, **{**TINY, "num_classes": 10})), r"10-class head.*num_classes=0"),
        (lambda: SimMIM(swinv2.create_model(V2, **TINY), norm_target_patch_size=46), r"odd integer >= 3.*got 46"),
        (lambda: SimMIM(swinv2.create_model(V2, **TINY), in_chans=1), r"in_chans=1 but the encoder takes 3"),
        (lambda: SimMIM(torch.nn.Linear(2, 2)), r"needs a Swin encoder"),
    ],
)
def test_construction_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_input_errors():
    model = tiny_simmim()
    with pytest.raises(ValueError, match=r"image size 48x64 is not a multiple of the SimMIM decoder stride 32"):
        model(torch.randn(1, 3, 48, 64), torch.zeros(1, 12, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask shape \(1, 8, 8\) does not fit images of 64x64: expected \(1, 16"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 8, 8, dtype=torch.long))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    encoder = swinv2.create_model(V2, **{**TINY, "img_size": 32, "depths": (1, 1), "num_heads": (1, 2)})
    model = randomize_(SimMIM(encoder, norm_target_patch_size=7))
    images, mask = torch.randn(2, 3, 32, 32), masks(32, 2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    compiled(images, mask).backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(images, mask).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(compiled_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
