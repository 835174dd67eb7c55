"""Start-up steps shared by every training run (pretraining, fine-tuning)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpointing import CheckpointManager, ResumePoint
from .config import ConfigError, to_dict, to_yaml
from .files import write_text_atomic
from .tracking import Tracker

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs; every rank uses the same seed so initial weights agree."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def announce_config(cfg: Any, out: Path, rank: int) -> None:
    """Print the resolved config and save it as ``out/config.yaml`` (rank 0)."""
    if rank == 0:
        text = to_yaml(cfg)
        print(text, flush=True)
        write_text_atomic(out / "config.yaml", text)


def steps_per_epoch(batches_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps per data epoch; an epoch shorter than one optimizer step is a config error."""
    steps = batches_per_epoch // accumulation
    if steps == 0:
        raise ConfigError(
            f"one epoch has {batches_per_epoch} batches per rank, fewer than the {accumulation} accumulation steps "
            "of one optimizer step: raise data.samples_per_epoch or lower deepspeed.global_batch"
        )
    return steps


def resume_and_track(
    engine: Any, checkpoints: CheckpointManager, point: ResumePoint | None, cfg: Any, out: Path, rank: int,
    total_steps: int,
) -> tuple[int, int, Tracker]:
    """Load ``point`` into ``engine`` (if resuming) and start tracking at its step, continuing its wandb run.

    Returns ``(start_step, data_epoch, tracker)``.
    """
    client = checkpoints.load(engine, point) if point else {}
    start_step, data_epoch = client.get("step", 0), client.get("data_epoch", 0)
    tracker = Tracker(cfg.wandb, out, to_dict(cfg), rank, total_steps, start_step, client.get("wandb_id"),
                      cfg.run.log_every)
    if point:
        universal = " (universal checkpoint: world size changed)" if point.universal else ""
        tracker.print(f"resumed from {checkpoints.dir / point.tag} at step {start_step}{universal}")
    return start_step, data_epoch, tracker
