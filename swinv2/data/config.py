"""The data options as one dataclass, meant to be embedded in the training config (OmegaConf structured configs)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "random")
ERASE_MODES = ("const", "rand", "pixel")


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed, decoded, augmented and batched.

    Sizes are per rank: ``batch_size`` images per step on each rank, ``samples_per_epoch`` images each rank
    sees per training epoch (``0``: the data set size from ``dataset.json`` divided by the world size). The image
    size is not a data option: it is the model's input size (``model.img_size``), handed to
    :func:`swinv2.data.build_loader` as ``img_size``.
    URLs are brace patterns, folders, globs, ``pipe:``/``s3://``/``gs://``/``http(s)://`` URLs or
    ``demo:train``/``demo:val``; several are joined with ``::`` (see :func:`swinv2.data.expand_urls`).
    """

    train_urls: str = ""
    eval_urls: str = ""
    batch_size: int = 64
    eval_batch_size: int | None = None  # None: batch_size
    num_workers: int = 4
    samples_per_epoch: int = 0
    shuffle_buffer: int = 2000  # raw (undecoded) samples held per worker; 0 turns shuffling off
    seed: int = 0
    # JPEGs decode at 1/2, 1/4 or 1/8 scale while their shorter side stays >= draft_factor * the model's img_size;
    # 0 = off.
    draft_factor: float = 1.5
    # Evaluation: resize the shorter side to img_size / crop_pct, then centre crop img_size.
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Fine-tuning augmentation, passed to timm.data.create_transform (kind="train").
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    # DataLoader
    pin_memory: bool = True  # only takes effect when CUDA is available
    prefetch_factor: int = 2
    timeout_s: float = 0.0  # seconds to wait for one batch from a worker; 0 waits forever
    max_consecutive_errors: int = 100  # this many unreadable samples in a row stop the run instead of spinning

    def __post_init__(self) -> None:
        self.validate()

    def problems(self) -> list[str]:
        """One sentence per bad option (empty when all are fine)."""
        out: list[str] = []

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                out.append(f"data.{name} must be {what}, got {getattr(self, name)!r}.")

        need(_int(self.batch_size) and self.batch_size > 0, "batch_size", "a positive integer")
        need(self.eval_batch_size is None or (_int(self.eval_batch_size) and self.eval_batch_size > 0),
             "eval_batch_size", "a positive integer or null")
        need(_int(self.num_workers) and self.num_workers >= 0, "num_workers", "a non-negative integer")
        need(_int(self.samples_per_epoch) and self.samples_per_epoch >= 0, "samples_per_epoch",
             "a non-negative integer (0 = data set size / world size)")
        need(_int(self.shuffle_buffer) and self.shuffle_buffer >= 0, "shuffle_buffer", "a non-negative integer")
        need(_int(self.seed) and self.seed >= 0, "seed", "a non-negative integer")
        need(self.draft_factor == 0 or self.draft_factor >= 1, "draft_factor", "0 (off) or at least 1")
        need(0 < self.crop_pct <= 1, "crop_pct", "in (0, 1]")
        need(self.interpolation in INTERPOLATIONS, "interpolation", f"one of {', '.join(INTERPOLATIONS)}")
        need(len(self.mean) == 3, "mean", "three numbers (RGB)")
        need(len(self.std) == 3 and all(s > 0 for s in self.std), "std", "three positive numbers (RGB)")
        need(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, "scale", "two numbers 0 < lo <= hi <= 1")
        need(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], "ratio", "two numbers 0 < lo <= hi")
        need(0 <= self.hflip <= 1, "hflip", "a probability in [0, 1]")
        need(self.color_jitter >= 0, "color_jitter", "non-negative")
        need(self.auto_augment is None or isinstance(self.auto_augment, str), "auto_augment",
             "a timm policy string such as 'rand-m9-mstd0.5-inc1' or null")
        need(0 <= self.re_prob <= 1, "re_prob", "a probability in [0, 1]")
        need(self.re_mode in ERASE_MODES, "re_mode", f"one of {', '.join(ERASE_MODES)}")
        need(_int(self.re_count) and self.re_count >= 1, "re_count", "a positive integer")
        need(_int(self.prefetch_factor) and self.prefetch_factor >= 1, "prefetch_factor", "a positive integer")
        need(self.timeout_s >= 0, "timeout_s", "non-negative (0 waits forever)")
        need(_int(self.max_consecutive_errors) and self.max_consecutive_errors >= 1, "max_consecutive_errors",
             "a positive integer")
        return out

    def validate(self) -> DataConfig:
        """Raise ``ValueError`` listing every bad option, one sentence each; return ``self`` when all are fine."""
        bad = self.problems()
        if bad:
            raise ValueError(" ".join(bad))
        return self

    @classmethod
    def coerce(cls, cfg: Any) -> DataConfig:
        """Accept a ``DataConfig``, an OmegaConf ``DictConfig`` of one, or a plain mapping of its fields."""
        if isinstance(cfg, cls):
            return cfg.validate()
        if type(cfg).__name__ == "DictConfig":  # avoid importing omegaconf unless it is in use
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, dict):
            raise TypeError(f"expected a DataConfig or a mapping of its fields, got {type(cfg).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"data.{unknown[0]} is not a data option; the options are: {', '.join(sorted(known))}.")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        return cls(**values)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
