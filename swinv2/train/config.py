"""The training configuration: typed dataclass sections merged from YAML and ``key=value`` overrides (OmegaConf).

The sections every run shares (model, data, optimizer, schedule, DeepSpeed, checkpoints, wandb, run), their base
:class:`TrainConfig` and the loader :func:`load_config`. The runs' schemas subclass it: SimMIM pretraining's in
:mod:`simmim.config`, fine-tuning's in :mod:`swinv2.finetune.config`; each states its recipe's defaults. Each section
lists its own problems (``problems()``); the config adds the checks across sections. Unknown keys and wrong types
fail at start-up with the key's name.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data.config import DataConfig
from ..variants import VARIANTS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # deepspeed.precision -> dtype
PRECISIONS = tuple(DTYPES)
SCHEDULES = ("multistep", "cosine")
WANDB_MODES = ("online", "offline", "disabled")
NONFINITE_ACTIONS = ("stop", "skip", "rollback")
T = TypeVar("T", bound="TrainConfig")


def unmet(*checks: tuple[bool, str]) -> list[str]:
    """The messages of the checks that fail."""
    return [message for ok, message in checks if not ok]


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

    def problems(self) -> list[str]:
        """One sentence per bad option (empty when all are fine); so for every section below."""
        if self.name not in VARIANTS:
            close = difflib.get_close_matches(self.name, VARIANTS, n=3, cutoff=0.6) or ["swinv2_tiny_window8_256"]
            return [f"model.name={self.name!r} is not a model: choose one of swinv2.list_models(), e.g. "
                    f"{', '.join(close)}"]
        variant = VARIANTS[self.name]
        depths, heads = list(self.depths or variant["depths"]), list(self.num_heads or variant["num_heads"])
        widths = [(self.embed_dim or variant["embed_dim"]) * 2**i for i in range(len(heads))]  # doubles per stage
        return unmet((self.img_size > 0 and self.img_size % 4 == 0,
                      f"model.img_size={self.img_size} must be a multiple of the patch size 4"),
                     (self.window_size is None or self.window_size > 0,
                      f"model.window_size={self.window_size} must be positive (or null: the variant's)"),
                     (self.embed_dim is None or self.embed_dim > 0, "model.embed_dim must be positive"),
                     (len(depths) == len(heads) and min(depths, default=1) >= 0 and min(heads, default=1) > 0,
                      f"model.depths={depths} and model.num_heads={heads} must have one entry per stage and at "
                      "least one head each"),
                     (not heads or min(heads) <= 0 or all(w % h == 0 for w, h in zip(widths, heads, strict=True)),
                      f"model.num_heads={heads} must divide each stage's width {widths} (model.embed_dim doubled per "
                      "stage)"))

    def create_kwargs(self, training: bool = True) -> dict[str, Any]:
        """Keyword arguments of ``swinv2.create_model(self.name, **kwargs)``. Architecture overrides left at None are
        omitted (the named variant's apply); ``training=False`` also leaves out the training-only options (drop path,
        activation checkpointing, attention chunking), e.g. for a ``model.json`` that describes the model."""
        arch = dict(img_size=self.img_size, window_size=self.window_size,
                    pretrained_window_sizes=self.pretrained_window_sizes, embed_dim=self.embed_dim, depths=self.depths,
                    num_heads=self.num_heads, extra_norm_every=self.extra_norm_every)
        kwargs = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in arch.items() if v is not None}
        if training:
            kwargs.update(drop_path_rate=self.drop_path_rate, checkpoint_activations=self.checkpoint_activations,
                          attn_chunk_size=self.attn_chunk_size or None)  # 0 and None: unchunked
        return kwargs


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
    layer_decay: float = 1.0  # fine-tuning: layer-wise LR decay (docs/finetuning.md); 1.0 is off

    def problems(self) -> list[str]:
        return unmet((self.base_lr > 0, "optim.base_lr must be positive"),
                     (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                      f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.999]"),
                     (self.eps > 0, "optim.eps must be positive"),
                     (0 < self.layer_decay <= 1, "optim.layer_decay must be in (0, 1]"))


@dataclass
class ScheduleConfig:
    """Per-step linear warmup, then ``multistep`` (x ``gamma`` at each milestone) or ``cosine`` to ``min_lr``."""

    epochs: float = 800
    warmup_epochs: float = 10
    kind: str = "multistep"
    milestones: list[float] = field(default_factory=lambda: [700.0])  # epochs
    gamma: float = 0.1

    def problems(self) -> list[str]:
        return unmet((self.kind in SCHEDULES, f"schedule.kind must be one of {', '.join(SCHEDULES)}"),
                      (self.epochs > 0, "schedule.epochs must be positive"),
                      (0 <= self.warmup_epochs <= self.epochs,
                       "schedule.warmup_epochs must be between 0 and schedule.epochs"))


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

    def problems(self) -> list[str]:
        return unmet(
            (self.precision in PRECISIONS, f"deepspeed.precision must be one of {', '.join(PRECISIONS)}"),
            (self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage must be 0, 1, 2 or 3"),
            (self.global_batch > 0, "deepspeed.global_batch must be positive"),
            (not self.offload_params or self.zero_stage == 3, "deepspeed.offload_params needs deepspeed.zero_stage=3"),
            (not self.offload_optimizer or self.zero_stage >= 1, "deepspeed.offload_optimizer needs zero_stage >= 1"))


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints in ``run.output_dir/checkpoints``; the last ``keep_last`` are kept. ``at_end=false``
    skips the checkpoint of a run that finished or reached ``run.max_steps`` (speed benchmarks, where a SwinV2-B ZeRO
    checkpoint is 1.5 GB of writing); a preemption signal or Ctrl-C still writes one."""

    every_steps: int = 1000
    keep_last: int = 3
    at_end: bool = True

    def problems(self) -> list[str]:
        return []  # any values work (the manager keeps at least the newest checkpoint)


@dataclass
class WandbConfig:
    """Weights & Biases tracking from rank 0 (``offline`` and ``disabled`` need no network)."""

    project: str = "swinv2-simmim"
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "online"

    def problems(self) -> list[str]:
        return unmet((self.mode in WANDB_MODES, f"wandb.mode must be one of {', '.join(WANDB_MODES)}"))


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
    max_consecutive_skips: int = 10  # on_nonfinite=skip: this many non-finite steps in a row stop the run (0: never)
    slurm_requeue: bool | None = None  # scontrol requeue after the preemption checkpoint; None: if sbatch --requeue
    # The ranks agree on preemption and non-finite losses at report and checkpoint steps, and also every this many
    # steps (0: no extra ones). Each agreement is a host-device sync; a signal waits for the next one.
    sync_every: int = 0

    def problems(self) -> list[str]:
        steps = list(self.profile_steps)
        return unmet(
            (bool(self.output_dir.strip()), "run.output_dir is empty: set it to this run's own folder (an empty one "
                                            "would write into the current directory)"),
            (self.on_nonfinite in NONFINITE_ACTIONS, f"run.on_nonfinite must be one of {', '.join(NONFINITE_ACTIONS)}"),
            (self.max_rollbacks >= 0, "run.max_rollbacks must be non-negative"),
            (self.max_consecutive_skips >= 0, "run.max_consecutive_skips must be non-negative (0: no limit)"),
            (self.sync_every >= 0, "run.sync_every must be non-negative (0: only at report and checkpoint steps)"),
            (self.peak_tflops >= 0, "run.peak_tflops must be non-negative (0: from the GPU's name)"),
            (not steps or (len(steps) == 2 and 0 < steps[0] <= steps[1]),
             f"run.profile_steps={steps} must be [first, last] with 0 < first <= last (or [])"))


@dataclass
class TrainConfig:
    """The sections every training run shares; :class:`simmim.config.PretrainConfig` and
    :class:`swinv2.finetune.config.FinetuneConfig` subclass it, add their own sections and restate the defaults
    of their recipe. OmegaConf builds the subclass's schema from all its fields, the inherited ones included."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run: RunConfig = field(default_factory=RunConfig)
    resume: bool = True  # continue from the newest complete checkpoint in run.output_dir

    def sections(self) -> list[Any]:
        """Every section (a dataclass field; each has ``problems()``), the subclass's included, in field order."""
        return [value for f in fields(self) if is_dataclass(value := getattr(self, f.name))]

    def problems(self) -> list[str]:
        """Every problem of the config, one sentence each: each section's own, then the checks across sections.
        Subclasses extend this with their own cross-section checks."""
        out = [problem.rstrip(".") for section in self.sections() for problem in section.problems()]
        # fp32 without ZeRO has no overflow check, as the config shows; bf16 with its check off shows only on the
        # built engine, so the loop refuses that one.
        return out + unmet(
            (not (self.run.on_nonfinite == "skip" and self.deepspeed.zero_stage == 0
                  and self.deepspeed.precision == "fp32"),
             "run.on_nonfinite=skip needs an optimizer that drops non-finite updates, which fp32 without ZeRO has "
             "not: set deepspeed.zero_stage to 1 or more, or use run.on_nonfinite=rollback"))


class ConfigError(ValueError):
    """A bad config file or override, explained in one sentence."""


def read_yaml(path: str | os.PathLike) -> DictConfig:
    """A config file's top-level mapping, or a :class:`ConfigError` naming the file and the fix."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: pass an existing --config YAML")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where} "
                          f"({getattr(error, 'problem', None) or error}): fix its syntax") from None
    except (OmegaConfBaseException, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read as a config ({str(error).splitlines()[0]}): "
                          "give a YAML file of sections such as model: and optim:") from None
    if not isinstance(loaded, DictConfig):  # a list at the top level
        raise ConfigError(f"config file {str(path)!r} holds a list, not a mapping of sections: write its sections "
                          "as keys, e.g. 'model:' with 'name: ...' below it")
    return loaded


def _unparsable(override: str) -> bool:
    try:
        yaml.safe_load(override.split("=", 1)[1])
    except yaml.YAMLError:
        return True
    return False


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides: list[str] = ()) -> T:
    """Schema defaults <- YAML file <- ``key=value`` overrides, validated; returns a schema instance."""
    loaded = read_yaml(path) if path is not None else None
    try:
        cfg = OmegaConf.structured(schema)
        if loaded is not None:
            cfg = OmegaConf.merge(cfg, loaded)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value: write e.g. optim.base_lr=2e-4")
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except yaml.YAMLError as error:  # e.g. model.depths=[1,1 (the value is parsed as YAML)
            bad = next((o for o in overrides if _unparsable(o)), overrides[0])
            raise ConfigError(f"override {bad!r} is not a valid value ({str(error).splitlines()[0]}): quote or "
                              "bracket it as YAML, e.g. model.depths=[2,2,6,2]") from None
        cfg = OmegaConf.merge(cfg, dotlist)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        first = str(error).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {first}; fix it in the YAML file or the key=value override") from None
    except ValueError as error:  # a section's own validation (e.g. DataConfig) already names the key
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(str(error)) from None
    problems = obj.problems()
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    return obj


def to_yaml(cfg: TrainConfig | DictConfig) -> str:
    """The resolved config as YAML (printed at start, saved in the output directory and in checkpoints)."""
    return OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg))


def to_dict(cfg: TrainConfig | DictConfig) -> dict:
    """The resolved config as plain Python containers (for wandb and checkpoint client state)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=True)
