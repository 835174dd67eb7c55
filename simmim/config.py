"""The SimMIM pretraining configuration (``launch/pretrain.py``): the shared sections of
:mod:`swinv2.train.config` plus masking, held-out monitors and the kNN probe, with the SimMIM recipe as defaults.

Defaults are the SwinV2 SimMIM recipe (SimMIM arXiv 2111.09886 sec. 4.1, Swin V2 arXiv 2111.09883 sec. 4.1):
SwinV2-B at 192 px, window 12; AdamW 0.9/0.999, wd 0.05, base LR 1e-4 per 512 images, 10 warmup epochs from 5e-7,
step decay x0.1 at epoch 700 of 800, clip 5.0; mask patches of 32 px, mask ratio 0.6, normalised target 47. A config
file only states what differs. Unknown keys and wrong types fail at start-up with the key's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swinv2.train.config import ModelConfig, OptimConfig, RunConfig, ScheduleConfig, TrainConfig, WandbConfig, unmet


@dataclass
class SimMIMConfig:
    """Masking and target of SimMIM (arXiv 2111.09886 sec. 3; 47 is the SwinV2 normalised-target window)."""

    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    norm_target_patch_size: int = 47  # 0: plain pixels as the target

    def problems(self) -> list[str]:
        return unmet((self.mask_patch_size > 0, "simmim.mask_patch_size must be positive"),
                     (0 < self.mask_ratio < 1, "simmim.mask_ratio must be in (0, 1)"),
                      (self.norm_target_patch_size == 0 or self.norm_target_patch_size % 2 == 1,
                       "simmim.norm_target_patch_size must be odd (47 in the recipe) or 0 for plain pixels"))


@dataclass
class PretrainEvalConfig:
    """Held-out monitors of a pretraining run, every ``every_steps`` steps and at the end (0: only at the end).

    The held-out reconstruction loss runs on ``data.eval_urls`` (unlabelled is fine) with one fixed mask per image;
    the first ``num_images`` held-out images are shown as a reconstruction grid each time.
    """

    every_steps: int = 0
    num_images: int = 8

    def problems(self) -> list[str]:
        return unmet((self.every_steps >= 0 and self.num_images >= 0,
                       "eval.every_steps and eval.num_images must be non-negative"))


@dataclass
class ProbeConfig:
    """kNN probe of the encoder's pooled features (k = 20, cosine, votes weighted by exp(similarity / 0.07)):
    ``train_urls`` is the labelled bank, ``eval_urls`` the labelled queries; off while either is empty."""

    train_urls: str = ""
    eval_urls: str = ""
    k: int = 20
    temperature: float = 0.07

    def problems(self) -> list[str]:
        return unmet((bool(self.train_urls) == bool(self.eval_urls), "probe.train_urls and probe.eval_urls go "
                       "together: set both (labelled shards) or neither"),
                      (self.k > 0 and self.temperature > 0, "probe.k and probe.temperature must be positive"))


@dataclass
class PretrainConfig(TrainConfig):
    """Everything ``launch/pretrain.py`` needs (SimMIM pretraining): the shared sections with SimMIM's defaults, plus
    masking, held-out monitors and the kNN probe."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="swinv2_base_window12_192", img_size=192))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        base_lr=1e-4, warmup_lr=5e-7, min_lr=5e-6, lr_batch_reference=512, weight_decay=0.05, clip_grad=5.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        epochs=800, warmup_epochs=10, kind="multistep", milestones=[700.0], gamma=0.1))
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(project="swinv2-simmim"))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/simmim"))
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def problems(self) -> list[str]:
        """The shared problems and the sections' own, then SimMIM's checks across sections."""
        size, patch = self.model.img_size, self.simmim.mask_patch_size
        # The decoder undoes the encoder's stride of 32; masks cover whole mask patches.
        return super().problems() + unmet(
            (patch <= 0 or (size % 32 == 0 and size % patch == 0),  # patch <= 0: the section's own problem
             f"model.img_size={size} must be a multiple of 32 and of simmim.mask_patch_size={patch} for SimMIM "
             "(e.g. 192)"))
