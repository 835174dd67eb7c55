"""The Swin V2 paper's scale on paper (arXiv 2111.09883 sec. 3.5 and 4): SwinV2-B/L/H/G, SimMIM pretraining at
192/w12 and fine-tuning at 256/w16, 384/w24, 640/w40 and 1536/w32 (COCO's resolution), on 40 and 80 GB GPUs.

For each: the memory per rank at micro batch 1 with the paper's three techniques (ZeRO-1, activation checkpointing,
sequential attention in chunks of 16 windows), what it takes without each one, the lightest combination that fits
and the largest micro batch it allows. ``python launch/plan.py --paper-table`` prints it (docs/planner.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..finetune.config import FinetuneConfig
from ..flops import fake_cuda
from ..train.config import TrainConfig, load_config
from .gpus import GIB, GPUS
from .measure import measure
from .planner import Cluster, make_plan
from .search import with_setting
from .states import model_states

SIZES = ("base", "large", "huge", "giant")
TASKS = (("SimMIM 192/w12", 192, 12), ("fine-tune 256/w16", 256, 16), ("fine-tune 384/w24", 384, 24),
         ("fine-tune 640/w40", 640, 40), ("fine-tune 1536/w32", 1536, 32))
WORLD = 64  # data-parallel GPUs assumed for ZeRO's partitions
CHUNK = 16
GPU_NAMES = ("a100-40gb", "a100-80gb")
# The lightest first: ZeRO stage, activation checkpointing, chunk size.
LADDER = ((0, False, 0), (1, False, 0), (1, True, 0), (1, True, CHUNK), (2, True, CHUNK), (3, True, CHUNK))


def task_config(pretrain_schema: type[TrainConfig], size: str, img: int, window: int) -> TrainConfig:
    """The config of one table cell (pretraining at 192 with ``pretrain_schema``, e.g. ``simmim.config.PretrainConfig``,
    else a 1000-class fine-tune from 192/w12)."""
    name = [f"model.name=swinv2_{size}_window12_192", f"model.img_size={img}"]
    if img == 192:
        return load_config(pretrain_schema, None, name)
    return load_config(FinetuneConfig, None, [*name, f"model.window_size={window}",
                                              "model.pretrained_window_sizes=[12,12,12,6]", "model.num_classes=1000"])


def name(stage: int, ckpt: bool, chunk: int) -> str:
    parts = [f"ZeRO-{stage}"] if stage else []
    parts += ["ckpt"] if ckpt else []
    parts += [f"seq.attn/{chunk}"] if chunk else []
    return " + ".join(parts) or "none"


def row_plans(cfg: TrainConfig, recipe_for: Callable) -> dict[tuple, Any]:
    """Plans at micro batch 1 keyed by ``(gpu, zero_stage, checkpointing, chunk)`` for the settings in the table."""
    measured, plans = {}, {}
    for stage, ckpt, chunk in {*LADDER, (0, True, CHUNK), (1, False, CHUNK)}:
        setting = with_setting(cfg, zero_stage=stage, checkpoint_activations=ckpt, attn_chunk_size=chunk,
                               batch_size=1)
        recipe = recipe_for(setting)
        if (ckpt, chunk) not in measured:
            measured[ckpt, chunk] = measure(recipe)
        with fake_cuda():
            states = model_states(recipe.build(), setting, WORLD)
        for gpu in GPU_NAMES:
            plans[gpu, stage, ckpt, chunk] = make_plan(setting, measured[ckpt, chunk], states,
                                                       Cluster(GPUS[gpu], WORLD))
    return plans


def lightest(plans: dict[tuple, Any], gpu: str) -> str:
    """The first setting of :data:`LADDER` that fits, with its largest micro batch."""
    for s in LADDER:
        plan = plans[(gpu, *s)]
        if plan.fits:
            return f"{name(*s)} ({plan.max_micro_batch})"
    return "does not fit"


def paper_table(pretrain_schema: type, pretrain_recipe: Callable, finetune_recipe: Callable, sizes=SIZES,
                tasks=TASKS) -> str:
    """The markdown table of docs/planner.md (GiB per rank at micro batch 1, bf16, 64 GPUs). The pretraining rows use
    ``pretrain_schema`` and ``pretrain_recipe`` (SimMIM's, from :mod:`simmim`, which builds on swinv2)."""
    rows = ["| model | task | params | all three | without ZeRO-1 | without ckpt | without seq. attn | "
            "A100-40GB: lightest that fits (max micro batch) | A100-80GB: lightest that fits (max micro batch) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for label, img, window in tasks:
            plans = row_plans(task_config(pretrain_schema, size, img, window),
                              pretrain_recipe if img == 192 else finetune_recipe)
            gib = {s: f"{plans[('a100-40gb', *s)].per_rank_bytes['total'] / GIB:.1f}"
                   for s in ((1, True, CHUNK), (0, True, CHUNK), (1, False, CHUNK), (1, True, 0))}
            params = plans["a100-40gb", 1, True, CHUNK].params
            rows.append(f"| SwinV2-{size[0].upper()} | {label} | {params / 1e9:.2f}B | {gib[1, True, CHUNK]} | "
                        f"{gib[0, True, CHUNK]} | {gib[1, False, CHUNK]} | {gib[1, True, 0]} | "
                        f"{lightest(plans, 'a100-40gb')} | {lightest(plans, 'a100-80gb')} |")
    return "\n".join(rows)
