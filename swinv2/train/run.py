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


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs; every rank uses the same seed so initial weights agree."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def announce_config(cfg: Any, out: Path, rank: int) -> None:
    """Print the resolved config (rank 0); :func:`resume_and_track` saves it once the run has started."""
    if rank == 0:
        print(to_yaml(cfg), flush=True)


# Settings a resumed run must share with its checkpoint: the architecture (the weights must fit) and the global
# batch (the LR is scaled by it and a step counts that many images, so the schedule's position means it).
ARCHITECTURE_KEYS = ("name", "embed_dim", "depths", "num_heads", "extra_norm_every", "num_classes")


def check_resumable(saved: dict, cfg: Any, where: Path) -> None:
    """Refuse, in one sentence, to resume checkpoint ``where`` (its stored config ``saved``) with a config that
    builds another model or uses another global batch."""
    config = to_dict(cfg)
    changed = [f"model.{k}" for k in ARCHITECTURE_KEYS
               if k in config["model"] and saved.get("model", {}).get(k, config["model"][k]) != config["model"][k]]
    restart = "or start over with resume=false (or another run.output_dir)"
    if changed:
        key = changed[0].split(".")[1]
        raise ConfigError(
            f"checkpoint {where} was trained with {changed[0]}={saved['model'][key]!r} but the config says "
            f"{config['model'][key]!r}: resume with the run's model settings (its config.yaml), {restart}")
    before, now = saved.get("deepspeed", {}).get("global_batch"), cfg.deepspeed.global_batch
    if before is not None and before != now:
        raise ConfigError(
            f"checkpoint {where} was trained with deepspeed.global_batch={before} but the config says {now}, which "
            f"would change the LR and what a step of the schedule means: keep deepspeed.global_batch={before} "
            f"(data.batch_size and the GPU count may change; accumulation adapts), {restart}")


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

    Refuses (:class:`ConfigError`) a checkpoint trained with another architecture or global batch. The resolved
    config is saved as ``out/config.yaml`` only now that the run has started, so a run that fails to start, or
    a refused resume, leaves the run's existing one as it was. Returns ``(start_step, data_epoch, tracker)``.
    """
    client = {}
    if point:
        where = checkpoints.dir / point.tag
        check_resumable(checkpoints.meta(point.tag).get("config", {}), cfg, where)
        try:
            client = checkpoints.load(engine, point)
        except (RuntimeError, KeyError) as error:  # what the pre-check cannot see, in DeepSpeed's words
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise ConfigError(f"checkpoint {where} does not load into this run ({first}): resume with the run's "
                              "settings (its config.yaml), or start over with resume=false") from None
    if rank == 0:
        write_text_atomic(out / "config.yaml", to_yaml(cfg))
    start_step, data_epoch = client.get("step", 0), client.get("data_epoch", 0)
    tracker = Tracker(cfg.wandb, out, to_dict(cfg), rank, total_steps, start_step, client.get("wandb_id"),
                      cfg.run.log_every)
    if point:
        universal = " (universal checkpoint: world size changed)" if point.universal else ""
        tracker.print(f"resumed from {checkpoints.dir / point.tag} at step {start_step}{universal}")
    return start_step, data_epoch, tracker
