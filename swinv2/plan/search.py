"""Plan a config as it is, or search ZeRO stage x activation checkpointing x attention chunk size for the fastest
setting that fits (each setting at the largest micro batch that fits, divides the global batch and runs: the model
states depend on the micro batch, since bf16 with gradient accumulation sums in float32, and ZeRO-0 refuses it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..flops import fake_cuda
from ..train.config import TrainConfig
from ..train.engine import deepspeed_config
from .fake import Recipe
from .measure import Measured, measure
from .planner import Cluster, Plan, make_plan
from .states import model_states, refused

T = TypeVar("T", bound=TrainConfig)

CHUNK_SIZES = (0, 16, 4)  # windows attended at once (0: all), the Swin V2 paper's sequential attention (sec. 3.5)
RecipeFor = Callable[[TrainConfig], Recipe]


def with_setting(cfg: T, **changes: Any) -> T:
    """A copy of ``cfg`` with ``zero_stage``, ``checkpoint_activations``, ``attn_chunk_size``, ``batch_size`` set."""
    model = {k: v for k, v in changes.items() if k in ("checkpoint_activations", "attn_chunk_size")}
    ds = {k: v for k, v in changes.items() if k == "zero_stage"}
    data = {k: v for k, v in changes.items() if k == "batch_size"}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                               deepspeed=dataclasses.replace(cfg.deepspeed, **ds),
                               data=dataclasses.replace(cfg.data, **data))


def plan_config(cfg: TrainConfig, recipe_for: RecipeFor, cluster: Cluster, measured: Measured | None = None) -> Plan:
    """The plan of ``cfg`` as configured."""
    deepspeed_config(cfg, cluster.world)  # what the run refuses at start (ConfigError), the planner refuses too
    recipe = recipe_for(cfg)
    measured = measured or measure(recipe)
    with fake_cuda():
        states = model_states(recipe.build(), cfg, cluster.world)
    return make_plan(cfg, measured, states, cluster)


def search(cfg: TrainConfig, recipe_for: RecipeFor, cluster: Cluster) -> list[Plan]:
    """Every ZeRO stage x checkpointing x chunk size, each at its largest fitting micro batch (1 if none fits)."""
    plans = []
    for checkpointing in (False, True):
        for chunk in CHUNK_SIZES:
            base = with_setting(cfg, checkpoint_activations=checkpointing, attn_chunk_size=chunk)
            recipe = recipe_for(base)
            measured = measure(recipe)
            with fake_cuda():
                model = recipe.build()
                for stage in (0, 1, 2, 3):
                    plans.append(fitting_plan(with_setting(base, zero_stage=stage), model, measured, cluster))
    return plans


def fitting_plan(setting: TrainConfig, model: nn.Module, measured: Measured, cluster: Cluster) -> Plan:
    """``setting`` at the largest micro batch that divides the global batch, runs and fits; if none fits, at the
    smallest that runs (1, or for ZeRO-0 in bf16 the one without accumulation)."""
    world, batch = cluster.world, setting.deepspeed.global_batch
    candidates = [with_setting(setting, batch_size=m) for m in range(batch // world, 0, -1) if batch % (m * world) == 0]
    candidates = [c for c in candidates if not refused(c, world)] or [with_setting(setting, batch_size=1)]
    for candidate in candidates:
        plan = make_plan(candidate, measured, model_states(model, candidate, world), cluster)
        if plan.fits:
            return plan
    return plan


def fastest(plans: list[Plan]) -> Plan | None:
    """The fitting plan with the shortest step (ties: less memory), or ``None``."""
    fitting = [p for p in plans if p.fits]
    return min(fitting, key=lambda p: (p.step_seconds, p.per_rank_bytes["total"])) if fitting else None
