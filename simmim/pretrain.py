"""SimMIM pretraining run: config -> demo/shard stream -> SimMIM on a Swin encoder -> DeepSpeed -> step loop.

``launch/pretrain.py`` parses the command line and calls :func:`pretrain`; everything else lives here so tests
reach it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import swinv2
from swinv2.data import build_loader
from swinv2.flops import ImageFlops, image_flops
from swinv2.train.checkpointing import CheckpointManager
from swinv2.train.config import DTYPES, to_dict
from swinv2.train.engine import accumulation_steps, build_engine, init_distributed
from swinv2.train.loop import LoopEnd, train_loop
from swinv2.train.run import announce_config, resume_and_track, seed_everything, steps_per_epoch
from swinv2.train.tracking import Tracker

from .config import PretrainConfig
from .masking import MaskGenerator
from .model import SimMIM
from .monitors import PretrainMonitors, gathered
from .transforms import PretrainTransform, normalize_images
from .visualize import reconstruction_grid


def build_simmim(cfg: PretrainConfig) -> SimMIM:
    """The SimMIM model of the config (encoder built as ``cfg.model`` says, no classification head)."""
    m = cfg.model
    options: dict[str, Any] = dict(
        num_classes=0, img_size=m.img_size, drop_path_rate=m.drop_path_rate,
        checkpoint_activations=m.checkpoint_activations, attn_chunk_size=m.attn_chunk_size or None,
    )
    for key in ("window_size", "pretrained_window_sizes", "extra_norm_every", "embed_dim", "depths", "num_heads"):
        value = getattr(m, key)
        if value is not None:
            options[key] = list(value) if isinstance(value, (list, tuple)) else value
    encoder = swinv2.create_model(m.name, **options)
    return SimMIM(encoder, norm_target_patch_size=cfg.simmim.norm_target_patch_size or None)


def simmim_flops(cfg: PretrainConfig) -> ImageFlops:
    """Forward FLOPs per image of the config's SimMIM model (encoder, decoder and loss), counted on fake tensors."""
    size, grid = cfg.model.img_size, cfg.model.img_size // 4

    def forward(model: SimMIM, batch: int) -> torch.Tensor:
        return model(torch.empty(batch, 3, size, size), torch.zeros(batch, grid, grid, dtype=torch.long))

    return image_flops(lambda: build_simmim(cfg), forward)


def pretrain(cfg: PretrainConfig) -> LoopEnd:
    """Run (or resume) SimMIM pretraining as configured; returns where the loop stopped."""
    rank, world = init_distributed()
    # Needs the world size, so it is checked here rather than in load_config; still a ConfigError (exit 2).
    accumulation = accumulation_steps(cfg.deepspeed.global_batch, cfg.data.batch_size, world)
    seed_everything(cfg.run.seed)
    out = Path(cfg.run.output_dir)
    announce_config(cfg, out, rank)

    model = build_simmim(cfg)
    mask_generator = MaskGenerator(cfg.model.img_size, cfg.simmim.mask_patch_size, model.patch_size,
                                   cfg.simmim.mask_ratio)
    loader = build_loader(cfg.data, "pretrain", PretrainTransform(cfg.model.img_size, mask_generator), rank, world,
                          img_size=cfg.model.img_size)
    epoch_steps = steps_per_epoch(len(loader), accumulation)
    total_steps = max(1, round(cfg.schedule.epochs * epoch_steps))
    last_step = min(total_steps, cfg.run.max_steps) if cfg.run.max_steps else total_steps
    monitors = PretrainMonitors(cfg, mask_generator, rank, world)

    checkpoints = CheckpointManager(out / "checkpoints", cfg.checkpoint.keep_last, rank)
    point = checkpoints.resume_point(world) if cfg.resume else None
    engine = build_engine(model, cfg, world, epoch_steps, load_universal=bool(point and point.universal))
    start_step, data_epoch, tracker = resume_and_track(engine, checkpoints, point, cfg, out, rank, total_steps)
    dtype = DTYPES[cfg.deepspeed.precision]

    def compute_loss(batch: dict) -> torch.Tensor:
        images = normalize_images(batch["image"].to(engine.device, non_blocking=True), dtype)
        return engine(images, batch["mask"].to(engine.device, non_blocking=True))

    def after_step(step: int, batch: dict) -> None:
        every = cfg.run.image_every
        if (every and step % every == 0) or step == last_step:
            save_reconstruction(engine, batch, dtype, tracker, step)
        if monitors.due(step, last_step):
            monitors.run(engine.module, engine.device, dtype, tracker, step)

    if start_step == 0 and monitors.enabled:  # the reference point: the same measures on the initial weights
        monitors.run(engine.module, engine.device, dtype, tracker, 0)

    def client_state(step: int, epoch: int) -> dict:
        return {"step": step, "data_epoch": epoch, "wandb_id": tracker.run_id, "config": to_dict(cfg),
                "data_seed": cfg.data.seed}

    end = train_loop(
        engine, loader, compute_loss, start_step=start_step, total_steps=total_steps, data_epoch=data_epoch,
        tracker=tracker, checkpoints=checkpoints, checkpoint_every=cfg.checkpoint.every_steps,
        client_state=client_state, max_steps=cfg.run.max_steps, log_every=cfg.run.log_every, on_step=after_step,
        run=cfg.run, flops=simmim_flops(cfg),
    )
    tracker.print(f"stopped at step {end.step} ({end.reason}); checkpoints in {checkpoints.dir}, "
                  f"reconstructions in {out / 'images'}")
    tracker.finish()
    return end


@torch.no_grad()
def save_reconstruction(engine: Any, batch: dict, dtype: torch.dtype, tracker: Tracker, step: int) -> None:
    """Reconstruct up to 8 images of ``batch`` (collective under ZeRO-3) and save the grid on rank 0."""
    model: SimMIM = engine.module
    images = normalize_images(batch["image"][:8].to(engine.device), dtype)
    mask = batch["mask"][:8].to(engine.device)
    was_training = model.training
    model.eval()
    with gathered([model.mask_token]):
        reconstruction = model.reconstruct(images, mask)
    model.train(was_training)
    tracker.image("reconstruction", reconstruction_grid(images.float(), mask, reconstruction.float()), step)
