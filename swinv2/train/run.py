"""The start-up every training run shares (pretraining, fine-tuning): :func:`start_run` and its steps."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..files import write_text_atomic
from ..flops import ImageFlops
from .checkpoint_manager import CheckpointManager, ResumePoint
from .config import DTYPES, ConfigError, TrainConfig, to_dict, to_yaml
from .engine import accumulation_steps, build_engine, init_distributed
from .loop import LoopEnd, train_loop
from .output_dir import check_writable, lock_output_dir, release_output_dir
from .tracking import Tracker


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs; every rank uses the same seed so initial weights agree."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_summary(cfg: TrainConfig, out: Path) -> list[str]:
    """A few lines that say what the run is: model, data, batch and schedule, precision and ZeRO, where it writes;
    the whole resolved config is in ``out/config.yaml``."""
    model, data, ds = cfg.model, cfg.data, cfg.deepspeed
    window = f", window {model.window_size}" if model.window_size else ""
    samples = f", {data.samples_per_epoch} samples per epoch" if data.samples_per_epoch else ""
    offload = " (optimizer offloaded)" if ds.offload_optimizer else ""
    return [
        f"model: {model.name} at {model.img_size} px{window}",
        f"data: {data.train_urls or '(none)'}{samples}",
        f"batch: {ds.global_batch} images per step ({data.batch_size} per micro batch), {cfg.schedule.epochs:g} "
        f"epochs, LR {cfg.optim.base_lr:g} (at batch {cfg.optim.lr_batch_reference})",
        f"precision: {ds.precision}, ZeRO stage {ds.zero_stage}{offload}",
        f"output: {out} (the whole config: {out / 'config.yaml'})",
    ]


def announce_config(cfg: TrainConfig, out: Path, rank: int) -> None:
    """Print :func:`config_summary` (rank 0); :func:`resume_and_track` saves the whole config once the run has
    started."""
    if rank == 0:
        print("\n".join(config_summary(cfg, out)), flush=True)


# Settings a resumed run must share with its checkpoint: the architecture (the weights must fit) and the global
# batch (the LR is scaled by it and a step counts that many images, so the schedule's position means it).
# The input size and window are part of it: the attention masks, relative position tables and what the weights
# learnt depend on them (fine-tuning at another size goes through pretrained=, which adapts them).
ARCHITECTURE_KEYS = ("name", "embed_dim", "depths", "num_heads", "extra_norm_every", "num_classes", "img_size",
                     "window_size")


def check_resumable(saved: dict, cfg: TrainConfig, where: Path, saved_world: int = 0, world: int = 1) -> None:
    """Refuse, in one sentence, to resume checkpoint ``where`` (its stored config ``saved``, written on
    ``saved_world`` ranks) with a config that builds another model, uses another global batch, or on ``world``
    ranks would make another epoch length (:func:`check_epoch_length`)."""
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
    check_epoch_length(saved, cfg, where, saved_world, world)


def check_epoch_length(saved: dict, cfg: TrainConfig, where: Path, saved_world: int, world: int) -> None:
    """``data.samples_per_epoch`` counts per rank: on another number of ranks the same value makes another epoch,
    and the whole LR schedule (counted in epochs) would stretch or shrink under a resumed run. Refused with the
    value that keeps the epoch (and so the schedule) as it was."""
    before, now = saved.get("data", {}).get("samples_per_epoch", 0), cfg.data.samples_per_epoch
    if not (saved_world and before and now) or before * saved_world == now * world:
        return  # 0: the epoch is the data set's size (dataset.json), the same on any number of ranks
    keep, exact = divmod(before * saved_world, world)
    fix = (f"set data.samples_per_epoch={keep} to keep it" if not exact else
           f"resume on a number of ranks that divides {before * saved_world} (data.samples_per_epoch is per rank)")
    raise ConfigError(
        f"checkpoint {where} was trained on {saved_world} rank(s) with data.samples_per_epoch={before} per rank "
        f"({before * saved_world} samples per epoch), and on {world} rank(s) data.samples_per_epoch={now} makes "
        f"{now * world}, which would rescale the whole LR schedule: {fix}, or start over with resume=false")


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
    engine: Any, checkpoints: CheckpointManager, point: ResumePoint | None, cfg: TrainConfig, out: Path, rank: int,
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
        meta = checkpoints.meta(point.tag)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        check_resumable(meta.get("config", {}), cfg, where, meta["world_size"], world)
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


@dataclass
class TrainingRun:
    """One training run as :func:`start_run` sets it up, field by field in this order; the hooks see the fields
    set before them. After start-up :meth:`train` runs the step loop."""

    cfg: TrainConfig
    rank: int
    world: int
    out: Path
    accumulation: int  # micro batches per optimizer step on this world size
    model: nn.Module | None = None
    loader: Any = None  # the training stream (a swinv2.data.ShardLoader)
    epoch_steps: int = 0  # optimizer steps per data epoch
    total_steps: int = 0  # the whole schedule
    checkpoints: CheckpointManager | None = None
    point: ResumePoint | None = None  # the checkpoint resumed from, if any
    engine: Any = None
    start_step: int = 0
    data_epoch: int = 0
    tracker: Tracker | None = None
    dtype: torch.dtype = torch.float32  # the precision the model's inputs are cast to

    @property
    def last_step(self) -> int:
        """The step this invocation stops at: the schedule's end, or ``run.max_steps`` if that comes first."""
        max_steps = self.cfg.run.max_steps
        return min(self.total_steps, max_steps) if max_steps else self.total_steps

    def client_state(self, step: int, data_epoch: int) -> dict:
        """What every checkpoint stores besides DeepSpeed's state (the resume point, wandb run and config)."""
        return {"step": step, "data_epoch": data_epoch, "wandb_id": self.tracker.run_id, "config": to_dict(self.cfg),
                "data_seed": self.cfg.data.seed}

    def train(self, compute_loss: Callable[[dict], torch.Tensor], *, flops: ImageFlops,
              on_step: Callable[[int, dict], None] | None = None,
              on_epoch_end: Callable[[int, int], None] | None = None) -> LoopEnd:
        """The step loop from the start (or resume) step over :attr:`loader`; returns where it stopped."""
        cfg = self.cfg
        return train_loop(
            self.engine, self.loader, compute_loss, start_step=self.start_step, total_steps=self.total_steps,
            data_epoch=self.data_epoch, tracker=self.tracker, checkpoints=self.checkpoints,
            checkpoint_every=cfg.checkpoint.every_steps, client_state=self.client_state, max_steps=cfg.run.max_steps,
            log_every=cfg.run.log_every, on_step=on_step, on_epoch_end=on_epoch_end, run=cfg.run, flops=flops,
            checkpoint_at_end=cfg.checkpoint.at_end,
        )


def start_run(
    cfg: TrainConfig,
    build_model: Callable[[TrainingRun], nn.Module],
    build_loader: Callable[[TrainingRun], Any],
    prepare: Callable[[TrainingRun], None] | None = None,
    on_engine: Callable[[TrainingRun], None] | None = None,
) -> TrainingRun:
    """The start-up every training run shares (pretraining and fine-tuning), in this order:

    process group; the accumulation the global batch needs on this world size (a :class:`ConfigError` before
    anything is printed); every RNG seeded alike on all ranks, so ``build_model`` draws the same initial weights
    everywhere; the resolved config printed; ``build_model(run)``; ``build_loader(run)`` (the training stream;
    also the place for other streams, which then fail before anything is written); steps per epoch and in
    total; the output folder checked for writing and locked for this run (:mod:`.output_dir`: a second run into
    it is refused); the checkpoint manager and the resume point (a universal conversion if the world size changed);
    ``prepare(run)`` (e.g. the starting weights when not resuming, or a checkpoint manager of its own); the
    DeepSpeed engine; ``on_engine(run)``; the checkpoint loaded and tracking started (``config.yaml`` written
    only now).
    """
    rank, world = init_distributed()
    # Needs the world size, so it is checked here rather than in load_config; still a ConfigError (exit 2).
    accumulation = accumulation_steps(cfg.deepspeed.global_batch, cfg.data.batch_size, world)
    seed_everything(cfg.run.seed)
    run = TrainingRun(cfg, rank, world, Path(cfg.run.output_dir), accumulation)
    announce_config(cfg, run.out, rank)

    run.model = build_model(run)
    run.loader = build_loader(run)
    run.epoch_steps = steps_per_epoch(len(run.loader), accumulation)
    run.total_steps = max(1, round(cfg.schedule.epochs * run.epoch_steps))
    claim_output_dir(run.out, rank, world)
    try:
        _build(run, prepare, on_engine)
    except BaseException:  # a refused start (or Ctrl-C) frees the folder for the next try in this process
        release_output_dir(run.out)
        raise
    return run


def claim_output_dir(out: Path, rank: int, world: int) -> None:
    """Every rank checks it can write to ``out``; rank 0 takes the run lock (:mod:`.output_dir`) and all ranks
    refuse together, with the same sentence, if another run holds it."""
    check_writable(out)
    refusal = ""
    if rank == 0:
        try:
            lock_output_dir(out)
        except ConfigError as error:
            refusal = str(error)
    if world > 1:
        said = [refusal]
        torch.distributed.broadcast_object_list(said, src=0)
        refusal = said[0]
    if refusal:
        raise ConfigError(refusal)


def _build(run: TrainingRun, prepare: Callable[[TrainingRun], None] | None,
           on_engine: Callable[[TrainingRun], None] | None) -> None:
    """The rest of :func:`start_run` once the output folder is ours: checkpoints, the engine, tracking."""
    cfg, rank, world = run.cfg, run.rank, run.world
    run.checkpoints = CheckpointManager(run.out / "checkpoints", cfg.checkpoint.keep_last, rank)
    run.point = run.checkpoints.resume_point(world) if cfg.resume else None
    if prepare is not None:
        prepare(run)
    run.engine = build_engine(run.model, cfg, world, run.epoch_steps,
                              load_universal=bool(run.point and run.point.universal))
    if on_engine is not None:
        on_engine(run)
    run.start_step, run.data_epoch, run.tracker = resume_and_track(
        run.engine, run.checkpoints, run.point, cfg, run.out, rank, run.total_steps)
    run.dtype = DTYPES[cfg.deepspeed.precision]
