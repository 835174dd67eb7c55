"""The default per-image transforms of the fine-tuning and evaluation streams (both from timm's factory)."""

from __future__ import annotations

from collections.abc import Callable

from timm.data import create_transform

from .config import DataConfig


def train_transform(cfg: DataConfig) -> Callable:
    """Fine-tuning augmentation: RandomResizedCrop, flip, RandAugment/colour jitter, normalise, random erasing."""
    return create_transform(
        cfg.img_size,
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


def eval_transform(cfg: DataConfig) -> Callable:
    """Resize the shorter side to ``img_size / crop_pct``, centre crop ``img_size``, normalise."""
    interpolation = "bicubic" if cfg.interpolation == "random" else cfg.interpolation
    return create_transform(
        cfg.img_size,
        is_training=False,
        crop_pct=cfg.crop_pct,
        interpolation=interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
    )
