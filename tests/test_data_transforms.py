"""The fine-tuning transform from timm's factory, with RandAugment's full-strength posterize made to work."""

import numpy as np
from PIL import Image, ImageOps

from swinv2.data.config import DataConfig
from swinv2.data.transforms import train_transform


def _posterize_op(transform):
    (randaugment,) = [t for t in transform.transforms if hasattr(t, "ops")]
    (op,) = [op for op in randaugment.ops if op.name == "PosterizeIncreasing"]
    return randaugment, op


def test_full_strength_posterize_keeps_zero_bits_as_a_black_image():
    transform = train_transform(DataConfig(auto_augment="rand-m9-mstd0.5-inc1"), 32)
    randaugment, op = _posterize_op(transform)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0  # level 10 -> 4 - 4 = 0 bits kept
    assert not np.asarray(op(photo)).any()  # what keeping no bits means (and what Pillow < 13 returned)
    op.magnitude = 5  # 4 - 2 = 2 bits kept: Pillow's own posterize
    assert np.array_equal(np.asarray(op(photo)), np.asarray(ImageOps.posterize(photo, 2)))
    # the whole transform at full strength, posterize always on: no sample fails any more
    op.magnitude = 10
    randaugment.ops, randaugment.num_layers = [op], 1
    for _ in range(5):
        assert transform(photo).shape == (3, 32, 32)
