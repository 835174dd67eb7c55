"""DeepSpeed set-up: process group, the DeepSpeed config derived from ours, and the engine with our optimizer."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .optim import StepSchedule, param_groups


def init_distributed() -> tuple[int, int]:
    """Join (or, for a plain ``python`` run, create) the process group; returns ``(rank, world_size)``.

    Works under the ``deepspeed`` launcher, ``torchrun`` and a plain one-process ``python`` run. NCCL on GPUs,
    gloo on CPU.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(slurm_env(os.environ))
    if "RANK" not in os.environ:  # plain python: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def slurm_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's variables from SLURM's, for ``srun python launch/pretrain.py`` (one task per GPU).

    Empty outside a multi-task SLURM step. ``MASTER_ADDR`` must come from the job script (e.g. the first host of
    ``scontrol show hostnames $SLURM_JOB_NODELIST``); ``MASTER_PORT`` defaults to 29500.
    """
    if int(environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in environ:
        return {}
    if "MASTER_ADDR" not in environ:
        raise RuntimeError(
            "running under srun with several tasks but MASTER_ADDR is not set: export MASTER_ADDR=$(scontrol show "
            "hostnames $SLURM_JOB_NODELIST | head -n1) in the job script"
        )
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"), "MASTER_PORT": environ.get("MASTER_PORT", "29500")}


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """``global = micro x accumulation x world``; anything that does not divide is an error naming the fix."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"deepspeed.global_batch={global_batch} is not a multiple of data.batch_size x world size = "
            f"{micro_batch} x {world_size} = {per_step}: change deepspeed.global_batch or data.batch_size"
        )
    return global_batch // per_step


def deepspeed_config(cfg: Any, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for our config (values explicit: DeepSpeed resolves no ``"auto"``).

    ``load_universal``: the checkpoint to resume from is in DeepSpeed's universal format (world size changed).
    """
    ds, micro = cfg.deepspeed, cfg.data.batch_size
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    pin = torch.cuda.is_available()
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    out = {
        "train_batch_size": ds.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation_steps(ds.global_batch, micro, world_size),
        # DeepSpeed 0.19 clips at 1.0 unless told otherwise; 0 turns clipping off.
        "gradient_clipping": float(cfg.optim.clip_grad),
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {
            "enabled": ds.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": ds.fp16_initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO is fine
        "steps_per_print": 2**31 - 1,  # our loop reports
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if ds.extra_json:
        with open(ds.extra_json) as f:
            out = _merge(out, json.load(f))
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def build_optimizer(model: nn.Module, cfg: Any, lr: float) -> torch.optim.Optimizer:
    """AdamW over our parameter groups; DeepSpeed's CPU Adam when the optimizer state is offloaded."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(
        model, cfg.optim.weight_decay, cfg.optim.layer_decay)]
    betas, eps = tuple(cfg.optim.betas), cfg.optim.eps
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=torch.cuda.is_available() or None)


def scaled_lrs(cfg: Any) -> dict[str, float]:
    """Base, warmup and minimum LR scaled linearly by global batch / ``optim.lr_batch_reference``."""
    scale = cfg.deepspeed.global_batch / cfg.optim.lr_batch_reference
    return {"base_lr": cfg.optim.base_lr * scale, "warmup_lr": cfg.optim.warmup_lr * scale,
            "min_lr": cfg.optim.min_lr * scale}


def build_engine(model: nn.Module, cfg: Any, world_size: int, steps_per_epoch: int, load_universal: bool = False):
    """The DeepSpeed engine around ``model`` with our optimizer and per-step schedule (resumed with it)."""
    import deepspeed

    sc = cfg.schedule
    lrs = scaled_lrs(cfg)
    optimizer = build_optimizer(model, cfg, lrs["base_lr"])
    schedule = StepSchedule(
        optimizer,
        total_steps=max(1, round(sc.epochs * steps_per_epoch)),
        warmup_steps=round(sc.warmup_epochs * steps_per_epoch),
        kind=sc.kind,
        milestones=[round(m * steps_per_epoch) for m in sc.milestones],
        gamma=sc.gamma,
        **lrs,
    )
    config = deepspeed_config(cfg, world_size, load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    return engine
