"""The training configuration: typed dataclass sections merged from YAML and ``key=value`` overrides (OmegaConf).

The sections every run shares (model, optimizer, schedule, DeepSpeed, checkpoints, wandb, run) and the loader
:func:`load_config`. The runs' schemas compose them: SimMIM pretraining's in :mod:`simmim.config`, fine-tuning's
in :mod:`.finetune_config`; each states its recipe's defaults. Unknown keys and wrong types fail at start-up with
the key's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data.config import IMG_SIZE_MOVED

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # deepspeed.precision -> dtype
PRECISIONS = tuple(DTYPES)
SCHEDULES = ("multistep", "cosine")
WANDB_MODES = ("online", "offline", "disabled")
NONFINITE_ACTIONS = ("stop", "skip", "rollback")


@dataclass
class ModelConfig:
    """Which Swin to build (``swinv2.create_model`` name) and the options it is built with."""

    name: str = "swinv2_base_window12_192"
    img_size: int = 192
    # Architecture overrides (None: the named variant's), e.g. a small encoder for experiments and the demo.
    embed_dim: int | None = None
    depths: list[int] | None = None
    num_heads: list[int] | None = None
    window_size: int | None = None  # None: the variant's window
    pretrained_window_sizes: list[int] | None = None
    drop_path_rate: float = 0.1
    checkpoint_activations: bool = False
    attn_chunk_size: int = 0
    extra_norm_every: int | None = None  # None: the variant's default (6 for H and G)


@dataclass
class OptimConfig:
    """AdamW; learning rates are per ``lr_batch_reference`` images and scaled linearly by the global batch."""

    base_lr: float = 1e-4
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_batch_reference: int = 512
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    clip_grad: float = 5.0  # 0: no clipping
    layer_decay: float = 1.0  # fine-tuning: layer-wise LR decay (README, Fine-tuning); 1.0 is off


@dataclass
class ScheduleConfig:
    """Per-step linear warmup, then ``multistep`` (x ``gamma`` at each milestone) or ``cosine`` to ``min_lr``."""

    epochs: float = 800
    warmup_epochs: float = 10
    kind: str = "multistep"
    milestones: list[float] = field(default_factory=lambda: [700.0])  # epochs
    gamma: float = 0.1


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed runs it; the DeepSpeed JSON is derived from this (``extra_json`` is merged on top)."""

    global_batch: int = 2048  # = data.batch_size x accumulation x world size
    zero_stage: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "bf16"
    fp16_initial_scale_power: int = 16
    extra_json: str | None = None


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints in ``run.output_dir/checkpoints``; the last ``keep_last`` are kept."""

    every_steps: int = 1000
    keep_last: int = 3


@dataclass
class WandbConfig:
    """Weights & Biases tracking from rank 0 (``offline`` and ``disabled`` need no network)."""

    project: str = "swinv2-simmim"
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "online"


@dataclass
class RunConfig:
    """Where the run writes, its seed, and how often it reports."""

    output_dir: str = "runs/simmim"
    seed: int = 0
    max_steps: int = 0  # 0: the whole schedule; otherwise stop (and checkpoint) after this many steps
    log_every: int = 20
    image_every: int = 500  # reconstruction grid to wandb and PNG every this many steps (0: only at the end)
    compile: bool = False  # torch.compile the model for training
    tf32: bool = True  # fp32 runs on CUDA use TF32 matmuls and convolutions
    profile_steps: list[int] = field(default_factory=list)  # [a, b]: torch profiler trace of steps a..b
    peak_tflops: float = 0.0  # per device, for MFU; 0: from the GPU's name (or measured on the CPU)
    on_nonfinite: str = "stop"  # a non-finite loss: stop, skip the step's update, or rollback to the last checkpoint
    max_rollbacks: int = 3  # rollbacks before a non-finite loss stops the run anyway
    slurm_requeue: bool | None = None  # scontrol requeue after the preemption checkpoint; None: if sbatch --requeue
    # The ranks agree on preemption and non-finite losses at report and checkpoint steps, and also every this many
    # steps (0: no extra ones). Each agreement is a host-device sync; a signal waits for the next one.
    sync_every: int = 0


class ConfigError(ValueError):
    """A bad config file or override, explained in one sentence."""


def load_config(schema: type, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Any:
    """Schema defaults <- YAML file <- ``key=value`` overrides, validated; returns a schema instance."""
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist: pass an existing --config YAML")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f" at line {mark.line + 1}" if mark is not None else ""
                raise ConfigError(f"config file {str(path)!r} is not valid YAML{where} "
                                  f"({getattr(error, 'problem', None) or error}): fix its syntax") from None
            cfg = OmegaConf.merge(cfg, loaded)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value: write e.g. optim.base_lr=2e-4")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        if key == "data.img_size":  # one image size, the model's
            raise ConfigError(IMG_SIZE_MOVED) from None
        first = str(error).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {first}; fix it in the YAML file or the key=value override") from None
    except ValueError as error:  # a section's own validation (e.g. DataConfig) already names the key
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(str(error)) from None
    check(obj)
    return obj


def check(cfg: Any) -> None:
    """Cross-field checks the types cannot express, one sentence each."""
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    if hasattr(cfg, "deepspeed"):
        ds = cfg.deepspeed
        need(ds.precision in PRECISIONS, f"deepspeed.precision must be one of {', '.join(PRECISIONS)}")
        need(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage must be 0, 1, 2 or 3")
        need(ds.global_batch > 0, "deepspeed.global_batch must be positive")
        need(not ds.offload_params or ds.zero_stage == 3, "deepspeed.offload_params needs deepspeed.zero_stage=3")
        need(not ds.offload_optimizer or ds.zero_stage >= 1, "deepspeed.offload_optimizer needs zero_stage >= 1")
    if hasattr(cfg, "schedule"):
        sc = cfg.schedule
        need(sc.kind in SCHEDULES, f"schedule.kind must be one of {', '.join(SCHEDULES)}")
        need(sc.epochs > 0, "schedule.epochs must be positive")
        need(0 <= sc.warmup_epochs <= sc.epochs, "schedule.warmup_epochs must be between 0 and schedule.epochs")
    if hasattr(cfg, "run"):
        run = cfg.run
        need(run.on_nonfinite in NONFINITE_ACTIONS, f"run.on_nonfinite must be one of {', '.join(NONFINITE_ACTIONS)}")
        need(run.max_rollbacks >= 0, "run.max_rollbacks must be non-negative")
        if hasattr(cfg, "deepspeed"):  # the loop refuses the other set-up without a check (bf16 overflow check off)
            need(not (run.on_nonfinite == "skip" and cfg.deepspeed.zero_stage == 0
                      and cfg.deepspeed.precision == "fp32"),
                 "run.on_nonfinite=skip needs an optimizer that drops non-finite updates, which fp32 without ZeRO has "
                 "not: set deepspeed.zero_stage to 1 or more, or use run.on_nonfinite=rollback")
        need(run.sync_every >= 0, "run.sync_every must be non-negative (0: only at report and checkpoint steps)")
        need(run.peak_tflops >= 0, "run.peak_tflops must be non-negative (0: from the GPU's name)")
        steps = list(run.profile_steps)
        need(not steps or (len(steps) == 2 and 0 < steps[0] <= steps[1]),
             f"run.profile_steps={steps} must be [first, last] with 0 < first <= last (or [])")
    if hasattr(cfg, "wandb"):
        need(cfg.wandb.mode in WANDB_MODES, f"wandb.mode must be one of {', '.join(WANDB_MODES)}")
    if hasattr(cfg, "optim"):
        need(cfg.optim.base_lr > 0, "optim.base_lr must be positive")
        need(0 < cfg.optim.layer_decay <= 1, "optim.layer_decay must be in (0, 1]")
    if hasattr(cfg, "model") and isinstance(getattr(cfg.model, "img_size", None), int):
        size = cfg.model.img_size
        need(size > 0 and size % 4 == 0, f"model.img_size={size} must be a multiple of the patch size 4")
    if hasattr(cfg, "problems"):  # the schema's own checks, e.g. PretrainConfig's and FinetuneConfig's
        problems.extend(cfg.problems())
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (printed at start, saved in the output directory and in checkpoints)."""
    return OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain Python containers (for wandb and checkpoint client state)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=True)
