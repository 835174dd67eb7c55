"""SimMIM pretraining run: config -> demo/shard stream -> SimMIM on a Swin encoder -> DeepSpeed -> step loop.

``launch/pretrain.py`` parses the command line and calls :func:`pretrain`; everything else lives here so tests
reach it.
"""

from __future__ import annotations

from typing import Any

import torch

import swinv2
from swinv2.data import build_loader
from swinv2.flops import ImageFlops, image_flops
from swinv2.train.loop import LoopEnd
from swinv2.train.run import TrainingRun, start_run
from swinv2.train.tracking import Tracker

from .config import PretrainConfig
from .masking import MaskGenerator
from .model import SimMIM
from .monitors import PretrainMonitors, gathered
from .transforms import PretrainTransform, normalize_images
from .visualize import reconstruction_grid


def build_simmim(cfg: PretrainConfig) -> SimMIM:
    """The SimMIM model of the config (encoder built as ``cfg.model`` says, no classification head)."""
    encoder = swinv2.create_model(cfg.model.name, num_classes=0, **cfg.model.create_kwargs())
    return SimMIM(encoder, norm_target_patch_size=cfg.simmim.norm_target_patch_size or None)


def simmim_flops(cfg: PretrainConfig) -> ImageFlops:
    """Forward FLOPs per image of the config's SimMIM model (encoder, decoder and loss), counted on fake tensors."""
    size, grid = cfg.model.img_size, cfg.model.img_size // 4

    def forward(model: SimMIM, batch: int) -> torch.Tensor:
        return model(torch.empty(batch, 3, size, size), torch.zeros(batch, grid, grid, dtype=torch.long))

    return image_flops(lambda: build_simmim(cfg), forward)


def pretrain(cfg: PretrainConfig) -> LoopEnd:
    """Run (or resume) SimMIM pretraining as configured; returns where the loop stopped."""
    size = cfg.model.img_size
    mask_generator: MaskGenerator | None = None
    monitors: PretrainMonitors | None = None

    def streams(run: TrainingRun) -> Any:
        nonlocal mask_generator, monitors
        mask_generator = MaskGenerator(size, cfg.simmim.mask_patch_size, run.model.patch_size, cfg.simmim.mask_ratio)
        transform = PretrainTransform(size, mask_generator, cfg.data.hflip)
        loader = build_loader(cfg.data, "pretrain", transform, run.rank, run.world, img_size=size)
        monitors = PretrainMonitors(cfg, mask_generator, run.rank, run.world)
        return loader

    run = start_run(cfg, lambda run: build_simmim(cfg), streams)
    engine, dtype, tracker, last_step = run.engine, run.dtype, run.tracker, run.last_step

    def compute_loss(batch: dict) -> torch.Tensor:
        # float32 images: the SimMIM target is built from them; the model casts the encoder's copy to its dtype.
        images = normalize_images(batch["image"].to(engine.device, non_blocking=True), torch.float32)
        return engine(images, batch["mask"].to(engine.device, non_blocking=True))

    def after_step(step: int, batch: dict) -> None:
        every = cfg.run.image_every
        if (every and step % every == 0) or step == last_step:
            save_reconstruction(engine, batch, tracker, step)
        if monitors.due(step, last_step):
            monitors.run(engine.module, engine.device, dtype, tracker, step)

    if run.start_step == 0 and monitors.enabled:  # the reference point: the same measures on the initial weights
        monitors.run(engine.module, engine.device, dtype, tracker, 0)

    end = run.train(compute_loss, flops=simmim_flops(cfg), on_step=after_step)
    tracker.print(f"stopped at step {end.step} ({end.reason}); checkpoints in {run.checkpoints.dir}, "
                  f"reconstructions in {run.out / 'images'}")
    tracker.finish()
    return end


@torch.no_grad()
def save_reconstruction(engine: Any, batch: dict, tracker: Tracker, step: int) -> None:
    """Reconstruct up to 8 images of ``batch`` (collective under ZeRO-3) and save the grid on rank 0."""
    model: SimMIM = engine.module
    images = normalize_images(batch["image"][:8].to(engine.device), torch.float32)
    mask = batch["mask"][:8].to(engine.device)
    was_training = model.training
    model.eval()
    with gathered([model.mask_token]):
        reconstruction = model.reconstruct(images, mask)
    model.train(was_training)
    tracker.image("reconstruction", reconstruction_grid(images.float(), mask, reconstruction.float()), step)
