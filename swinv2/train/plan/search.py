"""Plan a config as it is, or search ZeRO stage x activation checkpointing x attention chunk size for the fastest
setting that fits (each setting at the largest micro batch that fits and divides the global batch)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .fake import Recipe, fake_cuda
from .measure import Measured, measure
from .planner import Cluster, Plan, largest_micro_batch, make_plan
from .states import comm_buffers, model_states

CHUNK_SIZES = (0, 16, 4)  # windows attended at once (0: all), the Swin V2 paper's sequential attention (sec. 3.5)
RecipeFor = Callable[[Any], Recipe]


def with_setting(cfg: Any, **changes: Any) -> Any:
    """A copy of ``cfg`` with ``zero_stage``, ``checkpoint_activations``, ``attn_chunk_size``, ``batch_size`` set."""
    model = {k: v for k, v in changes.items() if k in ("checkpoint_activations", "attn_chunk_size")}
    ds = {k: v for k, v in changes.items() if k == "zero_stage"}
    data = {k: v for k, v in changes.items() if k == "batch_size"}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                               deepspeed=dataclasses.replace(cfg.deepspeed, **ds),
                               data=dataclasses.replace(cfg.data, **data))


def plan_config(cfg: Any, recipe_for: RecipeFor, cluster: Cluster, measured: Measured | None = None) -> Plan:
    """The plan of ``cfg`` as configured."""
    recipe = recipe_for(cfg)
    measured = measured or measure(recipe)
    with fake_cuda():
        states = model_states(recipe.build(), cfg, cluster.world)
    return make_plan(cfg, measured, states, cluster)


def search(cfg: Any, recipe_for: RecipeFor, cluster: Cluster) -> list[Plan]:
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
                    setting = with_setting(base, zero_stage=stage)
                    states = model_states(model, setting, cluster.world)
                    comm = comm_buffers(measured.params, setting)
                    most = min(largest_micro_batch(states, measured, comm, cluster.gpu.memory),
                               setting.deepspeed.global_batch // cluster.world)
                    micro = next((m for m in range(most, 0, -1)
                                  if setting.deepspeed.global_batch % (m * cluster.world) == 0), 1)
                    plans.append(make_plan(with_setting(setting, batch_size=micro), measured, states, cluster))
    return plans


def fastest(plans: list[Plan]) -> Plan | None:
    """The fitting plan with the shortest step (ties: less memory), or ``None``."""
    fitting = [p for p in plans if p.fits]
    return min(fitting, key=lambda p: (p.step_seconds, p.per_rank_bytes["total"])) if fitting else None
