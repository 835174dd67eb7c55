"""The default per-image transforms of the fine-tuning and evaluation streams (both from timm's factory)."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image, ImageOps

from .config import DataConfig


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, also for 0 bits: at full strength RandAugment's increasing posterize keeps 0 bits, which
    Pillow 13 refuses (older Pillow returned a black image, as keeping no bits means; so does this)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform: Callable) -> Callable:
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):  # timm's RandAugment / AutoAugment
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def train_transform(cfg: DataConfig, img_size: int) -> Callable:
    """Fine-tuning augmentation to ``img_size`` (the model's input): RandomResizedCrop, flip, RandAugment/colour
    jitter, normalise, random erasing."""
    from timm.data import create_transform  # here, not at import: timm pulls in torchvision and torch._dynamo

    transform = create_transform(
        img_size,
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment or None,
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        re_prob=cfg.re_prob,
        re_mode=cfg.re_mode,
        re_count=cfg.re_count,
    )
    return _fix_posterize(transform)


def eval_transform(cfg: DataConfig, img_size: int) -> Callable:
    """Resize the shorter side to ``img_size / crop_pct``, centre crop ``img_size`` (the model's input), normalise."""
    from timm.data import create_transform

    interpolation = "bicubic" if cfg.interpolation == "random" else cfg.interpolation
    return create_transform(
        img_size,
        is_training=False,
        crop_pct=cfg.crop_pct,
        interpolation=interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
    )
