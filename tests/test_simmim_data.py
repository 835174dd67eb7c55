"""SimMIM pretraining transform, reconstruction grids and a small end-to-end learning run on drawn images."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from simmim_helpers import TINY, V2, masks, one_thread  # noqa: F401 (fixture
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import default_collate
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import simmim
import swinv2

MEAN, STD = np.array(IMAGENET_DEFAULT_MEAN), np.array(IMAGENET_DEFAULT_STD)

pytestmark = pytest.mark.usefixtures("one_thread")


def drawn_image(i: int, size: int = 64) -> Image.Image:
    """A real-looking picture: a colour gradient with an ellipse, a rectangle and a line, varied by ``i``."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    background = np.stack([xx * 200 + 30 * i, yy * 180 + 20, (1 - xx) * 120 + 40 * i], -1)
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([8 + 4 * i, 10, 36 + 4 * i, 40], fill=(220, 40 + 50 * i, 60))
    draw.rectangle([30, 28 + 3 * i, 58, 56], fill=(30, 90, 200 - 40 * i))
    draw.line([0, 60 - 10 * i, size - 1, 5 + 10 * i], fill=(250, 250, 250), width=3)
    return image


# ---------------------------------------------------------------- transform


def test_pretrain_transform_gives_pixels_normalised_on_device_and_a_fresh_mask_per_sample():
    gen = simmim.MaskGenerator((64, 96), mask_patch_size=16, model_patch_size=4)
    transform = simmim.PretrainTransform((64, 96), gen)
    colour = (200, 30, 90)
    image, mask = transform(Image.new("RGB", (150, 120), colour))
    assert image.shape == (3, 64, 96) and image.dtype == torch.uint8
    for c in range(3):  # a flat colour is the same after any crop or flip
        assert torch.equal(image[c], torch.full((64, 96), colour[c], dtype=torch.uint8))
    normalised = simmim.normalize_images(image[None])
    want = (np.array(colour) / 255 - MEAN) / STD  # float64 reference
    assert normalised.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(normalised[0, c], torch.full((64, 96), want[c], dtype=torch.float32))
    # the same float32 arithmetic as torchvision's ToTensor + Normalize in the workers: identical numbers
    photo = drawn_image(1).resize((96, 64))
    reference = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(T.ToTensor()(photo))
    assert torch.equal(simmim.normalize_images(T.PILToTensor()(photo)[None])[0], reference)
    assert simmim.normalize_images(image[None], torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="expected uint8 pixels"):
        simmim.normalize_images(normalised)
    assert mask.shape == (16, 24) and mask.sum() == 15 * 16  # ceil(24 * 0.6) = 15 cells of 4x4 tokens
    draws = {tuple(transform(Image.new("RGB", (96, 64)))[1].flatten().tolist()) for _ in range(10)}
    assert len(draws) == 10
    grey, _ = transform(Image.new("L", (100, 100), 128))  # grey-scale files come out as 3 channels
    assert grey.shape == (3, 64, 96)


def test_pretrain_transform_is_torchvisions_random_resized_crop_and_flip():
    transform = simmim.PretrainTransform(64, simmim.MaskGenerator(64, 16, 4))
    photo = drawn_image(3, size=150).resize((150, 110))
    flips = set()
    for seed in range(20):  # the same draws give exactly torchvision's pixels for that box and flip
        random.seed(seed)
        box, flip = transform.crop_box(*photo.size), random.random() < 0.5
        random.seed(seed)
        image, _ = transform(photo)
        want = TF.resized_crop(photo, *box, [64, 64], interpolation=T.InterpolationMode.BILINEAR)
        assert torch.equal(image, TF.pil_to_tensor(TF.hflip(want) if flip else want))
        flips.add(flip)
    assert flips == {True, False}
    never = simmim.PretrainTransform(64, simmim.MaskGenerator(64, 16, 4), hflip=0.0)  # data.hflip=0: digits, text
    for seed in range(10):
        random.seed(seed)
        box = never.crop_box(*photo.size)
        want = TF.resized_crop(photo, *box, [64, 64], interpolation=T.InterpolationMode.BILINEAR)
        random.seed(seed)
        assert torch.equal(never(photo)[0], TF.pil_to_tensor(want))
    # the boxes follow torchvision's RandomResizedCrop distribution: 67-100 % of the area, aspect 3/4-4/3
    random.seed(0)
    ours = [transform.crop_box(300, 200) for _ in range(3000)]
    torch.manual_seed(0)
    scale, ratio = [0.67, 1.0], [3 / 4, 4 / 3]
    theirs = [T.RandomResizedCrop.get_params(torch.empty(3, 200, 300), scale, ratio) for _ in range(3000)]
    for boxes in (ours, theirs):
        assert all(0 <= top and top + h <= 200 and 0 <= left and left + w <= 300 for top, left, h, w in boxes)
        assert all(0.66 <= h * w / 60000 <= 1.0 and 0.74 <= w / h <= 1.35 for _, _, h, w in boxes)
    mean_area = [np.mean([h * w / 60000 for _, _, h, w in boxes]) for boxes in (ours, theirs)]
    mean_aspect = [np.mean([np.log(w / h) for _, _, h, w in boxes]) for boxes in (ours, theirs)]
    assert abs(mean_area[0] - mean_area[1]) < 0.01 and abs(mean_aspect[0] - mean_aspect[1]) < 0.02
    # a picture too wide for any allowed crop falls back to torchvision's centre crop at the widest aspect
    want = T.RandomResizedCrop.get_params(torch.empty(3, 100, 1000), scale, ratio)
    assert transform.crop_box(1000, 100) == tuple(want) == (0, 433, 100, 133)


def test_transform_and_mask_sizes_must_agree():
    with pytest.raises(ValueError, match=r"mask generator is for 192x192 images but img_size is 224x224"):
        simmim.PretrainTransform(224, simmim.MaskGenerator(192))


def test_collated_samples_feed_simmim():
    gen = simmim.MaskGenerator(64, 16, 4)
    transform = simmim.PretrainTransform(64, gen)
    images, mask = default_collate([transform(drawn_image(i)) for i in range(3)])
    assert images.shape == (3, 3, 64, 64) and mask.shape == (3, 16, 16)
    model = simmim.SimMIM(swinv2.create_model(V2, **TINY))
    assert torch.isfinite(model(simmim.normalize_images(images), mask))


# ---------------------------------------------------------------- grid


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Float64 reference un-normalisation: (3, H, W) normalised -> (H, W, 3) uint8."""
    rgb = x.double().numpy().transpose(1, 2, 0) * STD + MEAN
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def test_reconstruction_grid_panels_and_png_round_trip(tmp_path):
    images, reconstruction = torch.randn(3, 3, 64, 96), torch.randn(3, 3, 64, 96)
    images[0, :, :8, :8] = 50.0  # far outside [0, 1] after un-normalising: clipped to 255
    mask = masks((64, 96), 3)
    grid = simmim.reconstruction_grid(images, mask, reconstruction, max_images=2)
    assert grid.shape == (2 * 64, 4 * 96, 3) and grid.dtype == np.uint8
    assert grid[:8, :8].min() == 255 and grid.min() == 0
    for i in range(2):
        row = grid[i * 64 : (i + 1) * 64]
        original, masked, pasted, raw = (row[:, k * 96 : (k + 1) * 96].astype(int) for k in range(4))
        m = mask[i].repeat_interleave(4, 0).repeat_interleave(4, 1).bool().numpy()
        want_original, want_raw = to_pixels(images[i]).astype(int), to_pixels(reconstruction[i]).astype(int)
        assert np.abs(original - want_original).max() <= 1 and np.abs(raw - want_raw).max() <= 1
        assert np.abs(masked[~m] - want_original[~m]).max() <= 1 and np.all(np.abs(masked[m] - 127.5) <= 1)
        assert np.abs(pasted[~m] - want_original[~m]).max() <= 1 and np.abs(pasted[m] - want_raw[m]).max() <= 1
    Image.fromarray(grid).save(tmp_path / "grid.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), grid)


def test_reconstruction_grid_from_a_model():
    model = simmim.SimMIM(swinv2.create_model(V2, **TINY), norm_target_patch_size=47).eval()
    images, mask = torch.randn(2, 3, 64, 64), masks(64, 2)
    with torch.no_grad():
        grid = simmim.reconstruction_grid(images, mask, model.reconstruct(images, mask))
    assert grid.shape == (2 * 64, 4 * 64, 3)
    with pytest.raises(ValueError, match=r"mask \(2, 5, 5\) does not fit images"):
        simmim.reconstruction_grid(images, torch.zeros(2, 5, 5), images)


# ---------------------------------------------------------------- learning


def test_tiny_encoder_learns_to_fill_in_unseen_masks():
    """Trained on fresh random masks, the loss on a held-out set of masks falls by at least half (SimMIM sec. 3)."""
    pictures = np.stack([np.asarray(drawn_image(i)) / 255 for i in range(4)])
    images = torch.from_numpy((pictures - MEAN) / STD).permute(0, 3, 1, 2).float()  # (4, 3, 64, 64)
    held_out = masks(64, 4, seed=1000)
    torch.manual_seed(0)
    model = simmim.SimMIM(swinv2.create_model(V2, **TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    gen, draws = simmim.MaskGenerator(64, 16, 4), torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = model(images, held_out).item()
    for _ in range(120):
        loss = model(images, torch.stack([gen(generator=draws) for _ in range(4)]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model(images, held_out).item()
    assert after <= 0.5 * before, f"held-out loss {before:.3f} -> {after:.3f}"
