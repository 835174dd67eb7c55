"""The fine-tuning configuration: the shared sections of :mod:`swinv2.train.config` with classification defaults.

Defaults are the SimMIM fine-tuning recipe for SwinV2-B at 224/w14 from a 192/w12 pretraining
(SimMIM arXiv 2111.09886 sec. 4.1, Swin V2 arXiv 2111.09883 sec. 3.3): AdamW, LR 1.25e-3 per 512 images (scaled
linearly by the global batch, as the authors' code does) with warmup and minimum 2.5e-7, weight decay 0.05,
layer decay 0.75, 100 epochs with 20 of warmup then cosine, drop path 0.1, label smoothing 0.1, Mixup 0.8,
CutMix 1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, clip 5.0, global batch 2048.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..train.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    WandbConfig,
    load_config,
    unmet,
)

MIXUP_MODES = ("batch", "pair", "elem")


@dataclass
class ClassifierConfig(ModelConfig):
    """The classifier to fine-tune: a ``swinv2.create_model`` name rebuilt at ``img_size`` and ``window_size``.

    ``pretrained_window_sizes`` (per stage) are the windows the weights were pretrained with; Swin V2 divides its
    relative coordinates by them so the CPB MLP extrapolates to the new window (Swin V2 arXiv 2111.09883
    sec. 3.3). At 192 px, window 12, stage 4 is 6x6, hence (12, 12, 12, 6).
    """

    name: str = "swinv2_base_window12_192"
    img_size: int = 224
    window_size: int | None = 14
    pretrained_window_sizes: list[int] | None = field(default_factory=lambda: [12, 12, 12, 6])
    num_classes: int = 1000

    def problems(self) -> list[str]:
        return super().problems() + unmet(
            (self.num_classes > 0, "model.num_classes must be positive (the classifier's class count)"))

    def create_kwargs(self, training: bool = True) -> dict[str, Any]:
        """The encoder's ``create_model`` arguments with the classifier's ``num_classes`` first."""
        return {"num_classes": self.num_classes, **super().create_kwargs(training)}


@dataclass
class MixupConfig:
    """timm's Mixup/CutMix on each batch, with label smoothing inside the soft targets (off: both alphas 0)."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0  # chance that a batch is mixed at all
    switch_prob: float = 0.5  # chance of CutMix instead of Mixup when both are on
    mode: str = "batch"  # "batch", "pair" or "elem" (timm)
    label_smoothing: float = 0.1  # also used without Mixup (LabelSmoothingCrossEntropy)

    @property
    def enabled(self) -> bool:
        """Whether batches are mixed at all."""
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def problems(self) -> list[str]:
        return unmet((self.mode in MIXUP_MODES, f"mixup.mode must be one of {', '.join(MIXUP_MODES)}"),
                     (0 <= self.label_smoothing < 1, "mixup.label_smoothing must be in [0, 1)"),
                     (0 <= self.prob <= 1 and 0 <= self.switch_prob <= 1,
                      "mixup.prob and mixup.switch_prob must be probabilities in [0, 1]"))


@dataclass
class EmaConfig:
    """An exponential moving average of the weights (timm ``ModelEmaV3``, kept in float32), evaluated alongside."""

    enabled: bool = False
    decay: float = 0.9998
    warmup: bool = False  # ramp the decay up as 1 - (1 + step)^(-2/3): useful for short runs

    def problems(self) -> list[str]:
        return unmet((0 < self.decay < 1, "ema.decay must be in (0, 1)"))


@dataclass
class EvalConfig:
    """Evaluation on ``data.eval_urls`` (every sample exactly once across ranks) after epochs and at the end."""

    every_epochs: int = 1  # 0: only at the end

    def problems(self) -> list[str]:
        return unmet((self.every_epochs >= 0, "eval.every_epochs must be 0 (only at the end) or positive"))


@dataclass
class FinetuneConfig(TrainConfig):
    """Everything ``launch/finetune.py`` needs. ``pretrained``: a pretraining run directory or DeepSpeed
    checkpoint, or a weights file (ours, the authors' SimMIM or classification checkpoint, timm's); empty
    (``pretrained=``) trains from scratch. The images are cropped to ``model.img_size``."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(base_lr=1.25e-3, warmup_lr=2.5e-7, min_lr=2.5e-7, layer_decay=0.75)
    )
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(epochs=100, warmup_epochs=20, kind="cosine", milestones=[])
    )
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(project="swinv2-finetune"))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/finetune"))
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrained: str | None = ""  # "" or null (``pretrained=`` on a command line): from scratch

    def problems(self) -> list[str]:
        """The shared problems and the sections' own, then fine-tuning's checks across sections."""
        return super().problems() + unmet(
            (not self.mixup.enabled or self.data.batch_size % 2 == 0,
             "data.batch_size must be even with Mixup/CutMix (timm mixes each batch with its flipped self): change it "
             "or set mixup.mixup_alpha=0 mixup.cutmix_alpha=0"),
            (not self.ema.enabled or self.deepspeed.zero_stage < 3,
             "ema.enabled needs whole weights on every rank but deepspeed.zero_stage=3 shards them: use zero_stage 1 "
             "or 2, or set ema.enabled=false"))


def load_finetune_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> FinetuneConfig:
    """Schema defaults <- YAML <- ``key=value`` overrides, validated (the shared checks and fine-tuning's own),
    with the shards a fine-tuning run needs (``launch/plan.py`` loads the same schema without them)."""
    cfg = load_config(FinetuneConfig, path, overrides)
    missing = [message for urls, message in (
        (cfg.data.train_urls, "data.train_urls is empty: set it to the training shards (or demo:train)"),
        (cfg.data.eval_urls, "data.eval_urls is empty: set it to the validation shards (or demo:val)"),
    ) if not urls]
    if missing:
        raise ConfigError("; ".join(missing) + ".")
    return cfg
