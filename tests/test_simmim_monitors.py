"""Pretraining monitors: the kNN probe (hand-worked votes, separated clusters, exact over 2 real ranks) and the
held-out reconstruction loss (a direct float64 recomputation over the same images and masks, 1 and 2 ranks with
uneven shards, fixed masks per image)."""

from __future__ import annotations

import io
import math
import tarfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import write_tar
from dist_helpers import run_ranks
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import swinv2
from simmim import MaskGenerator, SimMIM, local_normalize, normalize_images, transforms
from simmim.heldout import HeldOutTransform, heldout_loss, key_masks
from simmim.model import pixel_mask
from swinv2.data import DataConfig, build_loader
from swinv2.train.knn import knn_predict, knn_top1


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_knn_votes_are_temperature_weighted_by_hand():
    # Label 0 at 0, 10 and 20 degrees, label 1 at 60; the query at 50 degrees. Its 3 nearest are 60 (cos 10 deg =
    # 0.985, label 1), 20 (0.866, label 0), 10 (0.766, label 0). T = 0.07: label 1 gets e^(0.985/0.07) = 1.29e6,
    # label 0 gets e^12.37 + e^10.94 = 2.92e5, so label 1 wins; T = 1: 2.68 against 2.38 + 2.15, label 0 wins
    # (the plain majority); k = 1: label 1.
    bank = torch.tensor([_unit(0), _unit(10), _unit(20), _unit(60)]) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    labels = torch.tensor([0, 0, 0, 1])
    query = torch.tensor([_unit(50)]) * 7.0  # lengths do not matter: features are L2-normalised
    assert knn_predict(bank, labels, query, 2, k=3, temperature=0.07).tolist() == [1]
    assert knn_predict(bank, labels, query, 2, k=3, temperature=1.0).tolist() == [0]
    assert knn_predict(bank, labels, query, 2, k=1).tolist() == [1]
    assert knn_predict(bank, labels, query, 2, k=50).tolist() == [1]  # k above the bank size uses the whole bank


def test_knn_separates_two_clusters_and_counts_errors():
    g = torch.Generator().manual_seed(0)
    centres = torch.zeros(2, 16)
    centres[0, 0], centres[1, 1] = 10.0, 10.0
    bank = torch.cat([centres[0] + torch.randn(40, 16, generator=g), centres[1] + torch.randn(40, 16, generator=g)])
    bank_labels = torch.tensor([0] * 40 + [1] * 40)
    queries = torch.cat([centres[0] + torch.randn(10, 16, generator=g), centres[1] + torch.randn(10, 16, generator=g)])
    labels = torch.tensor([0] * 10 + [1] * 10)
    assert knn_top1(bank, bank_labels, queries, labels, 2) == {"top1": 100.0, "count": 20}
    labels[:5] = 1  # five deliberately wrong answers
    assert knn_top1(bank, bank_labels, queries, labels, 2) == {"top1": 75.0, "count": 20}


def _knn_on_rank(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(1)
    bank, bank_labels = torch.randn(37, 8, generator=g), torch.randint(0, 4, (37,), generator=g)
    queries, labels = torch.randn(23, 8, generator=g), torch.randint(0, 4, (23,), generator=g)
    cut_bank, cut_queries = (30, 37) if rank == 0 else (0, 30), (0, 5) if rank == 0 else (5, 23)  # uneven shares
    if world == 1:
        cut_bank, cut_queries = (0, 37), (0, 23)
    return knn_top1(bank[slice(*cut_bank)], bank_labels[slice(*cut_bank)], queries[slice(*cut_queries)],
                    labels[slice(*cut_queries)], 4, k=5)


@pytest.mark.slow
def test_knn_is_exact_across_two_ranks(tmp_path):
    g = torch.Generator().manual_seed(1)
    bank, bank_labels = torch.randn(37, 8, generator=g), torch.randint(0, 4, (37,), generator=g)
    queries, labels = torch.randn(23, 8, generator=g), torch.randint(0, 4, (23,), generator=g)
    alone = knn_top1(bank, bank_labels, queries, labels, 4, k=5)
    assert 0 < alone["top1"] < 100  # random data: a result that a wrong split would change
    assert run_ranks(_knn_on_rank, 2, tmp_path) == [alone, alone]


# ---------------------------------------------------------------------------------------------- held-out loss

SIZES = [5, 1, 4]  # uneven shards: with 2 ranks, rank 0 reads shards 0 and 2 (9 images), rank 1 shard 1 (1 image)


def _noise_shards(folder) -> list[str]:
    rng = np.random.default_rng(0)
    paths, n = [], 0
    for s, size in enumerate(SIZES):
        samples = []
        for _ in range(size):
            pixels = rng.integers(0, 256, size=(48 + 8 * (n % 3), 72, 3), dtype=np.uint8)  # not square, varied
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, "PNG")  # lossless: the reference decodes the same pixels
            samples.append((f"img{n:04d}", {"png": out.getvalue()}))
            n += 1
        paths.append(str(write_tar(folder / f"held-{s:02d}.tar", samples)))
    return paths


def _simmim() -> tuple[SimMIM, MaskGenerator]:
    torch.manual_seed(0)
    encoder = swinv2.create_model("swinv2_tiny_window8_256", img_size=32, window_size=2, embed_dim=16,
                                  depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], num_classes=0)
    model = SimMIM(encoder, norm_target_patch_size=7)
    for block in (b for stage in encoder.layers for b in stage.blocks):  # open the zero-initialised post-norms
        torch.nn.init.normal_(block.norm1.weight, std=0.5)
        torch.nn.init.normal_(block.norm2.weight, std=0.5)
    return model, MaskGenerator(32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.6)


def _heldout_on_rank(rank: int, world: int, urls: list[str]) -> dict:
    model, generator = _simmim()
    cfg = DataConfig(eval_urls="::".join(urls), batch_size=3, num_workers=0)
    loader = build_loader(cfg, "heldout", HeldOutTransform(32), rank=rank, world_size=world, img_size=32)
    result = heldout_loss(model, loader, generator, torch.device("cpu"), keep=2)
    return {"loss": result.loss, "count": result.count, "kept": len(result.images), "zero": result.zero_loss}


@pytest.mark.slow
def test_heldout_loss_equals_a_direct_float64_computation_on_one_and_two_ranks(tmp_path):
    urls = _noise_shards(tmp_path)
    model, generator = _simmim()
    transform = HeldOutTransform(32)
    keys, images = [], []
    for path in urls:


        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                keys.append(member.name.rsplit(".", 1)[0])
                images.append(transform(Image.open(tar.extractfile(member)).convert("RGB")))
    x = normalize_images(torch.stack(images)).double()
    masks = key_masks(generator, keys)
    model64 = model.double().eval()
    with torch.no_grad():
        pred = model64.predict(x, masks)
    weight = pixel_mask(masks, 4).double()
    direct = ((local_normalize(x, 7) - pred).abs() * weight).sum() / (weight.sum() * 3)
    zero = (local_normalize(x, 7).abs() * weight).sum() / (weight.sum() * 3)  # the collapsed model's level

    one = _heldout_on_rank(0, 1, urls)
    assert one["count"] == sum(SIZES) and one["kept"] == 2
    assert one["loss"] == pytest.approx(direct.item(), rel=1e-5)
    assert one["zero"] == pytest.approx(zero.item(), rel=1e-5) and abs(one["zero"] - one["loss"]) > 1e-3
    two = run_ranks(_heldout_on_rank, 2, tmp_path / "ranks", urls)
    assert [r["count"] for r in two] == [sum(SIZES)] * 2
    assert two[0]["loss"] == two[1]["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two[0]["zero"] == two[1]["zero"] == pytest.approx(one["zero"], rel=1e-6)


class HostConstants(TorchDispatchMode):
    """Records the aten ops that run, and where in ``simmim/`` each tensor made from Python numbers
    (``torch.tensor(...)``, ``aten.lift_fresh``) was built: on a GPU each is a synchronising host-to-device copy."""

    def __init__(self):
        super().__init__()
        self.ops, self.built = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        if func is torch.ops.aten.lift_fresh.default:
            frames = [f for f in traceback.extract_stack() if "/simmim/" in f.filename]
            self.built.append(f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "elsewhere")
        return func(*args, **(kwargs or {}))


def test_normalisation_constants_are_built_once_per_device():
    """The meta device stands in for a GPU (a copy to it is an ``aten._to_copy``): after the first call the
    normalisation on the device is the uint8 -> float32 conversion and three in-place ops, no constant copied."""
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).double(), torch.tensor([0.229, 0.224, 0.225]).double()
    want = (pixels.double() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # ImageNet's, by hand
    torch.testing.assert_close(normalize_images(pixels).double(), want, rtol=1e-6, atol=1e-6)
    meta = pixels.to("meta")
    normalize_images(meta)
    with HostConstants() as seen:
        out = normalize_images(meta, torch.bfloat16)
    assert out.device.type == "meta" and out.dtype == torch.bfloat16
    assert seen.ops == ["aten._to_copy.default", "aten.div_.Tensor", "aten.sub_.Tensor", "aten.div_.Tensor",
                        "aten._to_copy.default"], seen.ops
    assert transforms.imagenet_stats("meta")[1] is transforms.imagenet_stats(torch.device("meta"))[1]


def test_heldout_loop_copies_no_constants_per_batch():
    """Three held-out batches: the normalisation constants are built once (two tensors), and nothing else in the
    held-out loop makes a tensor from Python numbers (the image count stays on the host until the end)."""
    model, generator = _simmim()
    batches = [{"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), "key": [f"{i}a", f"{i}b"]}
               for i in range(3)]
    transforms._STATS.clear()  # a fresh process: the first batch builds the CPU constants
    with HostConstants() as seen:
        result = heldout_loss(model, batches, generator, torch.device("cpu"), keep=2)
    ours = [b for b in seen.built if not b.startswith("masking.py")]  # masks are drawn on the host, as data
    assert [b.split(":")[0] for b in ours] == ["transforms.py", "transforms.py"], seen.built
    assert result.count == 6 and result.loss > 0


def test_heldout_masks_are_fixed_per_image_and_differ_between_images():
    generator = MaskGenerator(32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.6)
    torch.manual_seed(123)
    first = key_masks(generator, ["a", "b", "c"])
    torch.manual_seed(456)  # the global RNG has no say
    again = key_masks(generator, ["c", "a"])
    assert torch.equal(again, first[[2, 0]])
    assert not torch.equal(first[0], first[1])
    assert int(first[0].sum()) == generator.num_masked * generator.scale**2


def test_heldout_transform_centre_crops_after_resizing_the_shorter_side():
    pixels = np.arange(64 * 96 * 3, dtype=np.uint32).reshape(64, 96, 3) % 251
    image = Image.fromarray(pixels.astype(np.uint8))
    out = HeldOutTransform(64)(image)  # shorter side already 64: no resize, just the centre 64x64 crop
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    assert torch.equal(out, torch.from_numpy(pixels[:, 16:80].astype(np.uint8)).permute(2, 0, 1))
    small = HeldOutTransform(32)(image)  # halved, then the centre 32 of 48 columns
    expected = np.asarray(image.resize((48, 32), Image.Resampling.BILINEAR))[:, 8:40]
    assert torch.equal(small, torch.from_numpy(np.ascontiguousarray(expected)).permute(2, 0, 1))


@pytest.mark.parametrize("override,needle", [
    ("probe.eval_urls=''", "probe.train_urls and probe.eval_urls go together"),
    ("probe.k=0", "probe.k and probe.temperature must be positive"),
    ("eval.every_steps=-1", "eval.every_steps and eval.num_images must be non-negative"),
])
def test_bad_monitor_settings_are_one_sentence(override, needle):
    from simmim.config import PretrainConfig
    from swinv2.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(PretrainConfig, Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [override])
