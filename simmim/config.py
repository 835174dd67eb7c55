"""The SimMIM pretraining configuration (``launch/pretrain.py``): the shared sections of
:mod:`swinv2.train.config` plus masking, held-out monitors and the kNN probe, with the SimMIM recipe as defaults.

Defaults are the SwinV2 SimMIM recipe (SimMIM arXiv 2111.09886 sec. 4.1, Swin V2 arXiv 2111.09883 sec. 4.1):
SwinV2-B at 192 px, window 12; AdamW 0.9/0.999, wd 0.05, base LR 1e-4 per 512 images, 10 warmup epochs from 5e-7,
step decay x0.1 at epoch 700 of 800, clip 5.0; mask patches of 32 px, mask ratio 0.6, normalised target 47. A config
file only states what differs. Unknown keys and wrong types fail at start-up with the key's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swinv2.data.config import DataConfig
from swinv2.train.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    WandbConfig,
)


@dataclass
class SimMIMConfig:
    """Masking and target of SimMIM (arXiv 2111.09886 sec. 3; 47 is the SwinV2 normalised-target window)."""

    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    norm_target_patch_size: int = 47  # 0: plain pixels as the target


@dataclass
class PretrainEvalConfig:
    """Held-out monitors of a pretraining run, every ``every_steps`` steps and at the end (0: only at the end).

    The held-out reconstruction loss runs on ``data.eval_urls`` (unlabelled is fine) with one fixed mask per image;
    the first ``num_images`` held-out images are shown as a reconstruction grid each time.
    """

    every_steps: int = 0
    num_images: int = 8


@dataclass
class ProbeConfig:
    """kNN probe of the encoder's pooled features (k = 20, cosine, votes weighted by exp(similarity / 0.07)):
    ``train_urls`` is the labelled bank, ``eval_urls`` the labelled queries; off while either is empty."""

    train_urls: str = ""
    eval_urls: str = ""
    k: int = 20
    temperature: float = 0.07


@dataclass
class PretrainConfig:
    """Everything ``launch/pretrain.py`` needs (SimMIM pretraining)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="swinv2_base_window12_192", img_size=192))
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        base_lr=1e-4, warmup_lr=5e-7, min_lr=5e-6, lr_batch_reference=512, weight_decay=0.05, clip_grad=5.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        epochs=800, warmup_epochs=10, kind="multistep", milestones=[700.0], gamma=0.1))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(project="swinv2-simmim"))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/simmim"))
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    resume: bool = True  # continue from the newest complete checkpoint in run.output_dir

    def problems(self) -> list[str]:
        """SimMIM's own cross-field checks, one sentence each (``swinv2.train.config.load_config`` runs them after
        the shared ones)."""
        out = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                out.append(message)

        size, sm = self.model.img_size, self.simmim
        # The decoder undoes the encoder's stride of 32; masks cover whole mask patches.
        need(size % 32 == 0 and size % sm.mask_patch_size == 0,
             f"model.img_size={size} must be a multiple of 32 and of simmim.mask_patch_size={sm.mask_patch_size} "
             "for SimMIM (e.g. 192)")
        need(0 < sm.mask_ratio < 1, "simmim.mask_ratio must be in (0, 1)")
        need(sm.norm_target_patch_size == 0 or sm.norm_target_patch_size % 2 == 1,
             "simmim.norm_target_patch_size must be odd (47 in the recipe) or 0 for plain pixels")
        pr = self.probe
        need(bool(pr.train_urls) == bool(pr.eval_urls), "probe.train_urls and probe.eval_urls go together: set both "
             "(labelled shards) or neither")
        need(pr.k > 0 and pr.temperature > 0, "probe.k and probe.temperature must be positive")
        need(self.eval.every_steps >= 0 and self.eval.num_images >= 0,
             "eval.every_steps and eval.num_images must be non-negative")
        return out
