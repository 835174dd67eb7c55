"""Will a training config fit on my GPUs, with which ZeRO stage, activation checkpointing and attention chunk
size, and how long will a step take? Counted from first principles, no GPU needed (docs/planner.md).

    python launch/plan.py --config configs/simmim/swinv2_giant_192.yaml --gpu a100-40gb --gpus 128
    python launch/plan.py --config configs/finetune/swinv2_large_192to384.yaml --search data.batch_size=16
    python launch/plan.py --paper-table            # the Swin V2 paper's scale, B/L/H/G on 40 and 80 GB GPUs

``key=value`` overrides apply to the config as in training. ``--json`` ends the output with one JSON object.
Exit status 2 for a user error, and for a config that cannot fit at any setting.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from swinv2.commands import run_command
from swinv2.finetune.config import ClassifierConfig, FinetuneConfig
from swinv2.plan import gpus
from swinv2.plan.fake import classifier_recipe, is_pretraining
from swinv2.plan.paper import paper_table
from swinv2.plan.planner import Cluster
from swinv2.plan.report import cannot_fit, describe, gib, search_table, setting
from swinv2.plan.search import fastest, plan_config, search, with_setting
from swinv2.train.config import ConfigError, ModelConfig, load_config, read_yaml

from ..config import PretrainConfig
from ..plan import simmim_recipe


def _only_in(schema, other, model, other_model) -> set[str]:
    """The keys (``section`` or ``model.key``) that ``schema`` has and ``other`` has not."""
    return ({f.name for f in fields(schema)} - {f.name for f in fields(other)}) | {
        f"model.{f.name}" for f in fields(model) if f.name not in {g.name for g in fields(other_model)}}


# The keys that tell the schemas apart: pretraining's simmim and probe; fine-tuning's pretrained, mixup, ema and
# model.num_classes. Both have eval:, with different fields.
PRETRAIN_ONLY = _only_in(PretrainConfig, FinetuneConfig, ModelConfig, ClassifierConfig)
FINETUNE_ONLY = _only_in(FinetuneConfig, PretrainConfig, ClassifierConfig, ModelConfig)


def load(path: str, overrides: list[str]):
    """The config of ``path`` plus the overrides, with the schema that has its keys: fine-tuning's when it names a
    key only that one has, else pretraining's."""
    raw = read_yaml(path)
    model = raw.get("model") if hasattr(raw.get("model"), "keys") else {}
    keys = {str(k) for k in raw.keys()} | {f"model.{k}" for k in model.keys()}
    keys |= {o.split("=", 1)[0].strip() for o in overrides} | {o.split(".", 1)[0] for o in overrides}
    both = sorted(keys & PRETRAIN_ONLY), sorted(keys & FINETUNE_ONLY)
    if all(both):
        raise ConfigError(f"config {path!r} mixes pretraining keys ({', '.join(both[0])}) and fine-tuning keys "
                          f"({', '.join(both[1])}): a config is one or the other, so drop one kind")
    return load_config(FinetuneConfig if both[1] else PretrainConfig, path, overrides)


def recipe_for(cfg):
    return simmim_recipe(cfg) if is_pretraining(cfg) else classifier_recipe(cfg)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (pretraining or fine-tuning)")
    p.add_argument("--gpus", type=int, default=None, help="data-parallel GPUs (default: global batch / micro batch)")
    p.add_argument("--gpu", choices=sorted(gpus.GPUS), default="a100-80gb")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU, instead of the --gpu's")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--mfu", type=float, default=gpus.DEFAULT_MFU, help="model FLOPs utilisation assumed")
    p.add_argument("--intra-node-gbps", type=float, default=gpus.INTRA_NODE_GBPS, help="per-GPU Gbit/s in a node")
    p.add_argument("--inter-node-gbps", type=float, default=gpus.INTER_NODE_GBPS, help="per-GPU Gbit/s across nodes")
    p.add_argument("--search", action="store_true", help="all ZeRO stages x checkpointing x chunk sizes")
    p.add_argument("--json", action="store_true", help="end with the plan as one JSON object")
    p.add_argument("--paper-table", action="store_true", help="print the Swin V2 paper-scale table of docs/planner.md")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def cluster_for(args: argparse.Namespace, cfg) -> Cluster:
    gpu = gpus.GPUS[args.gpu]
    if args.gpu_memory is not None:
        if args.gpu_memory <= 0:
            raise ConfigError(f"--gpu-memory {args.gpu_memory:g} must be positive GiB, e.g. --gpu-memory 40")
        gpu = gpus.custom_gpu(args.gpu_memory, gpu)
    world = args.gpus if args.gpus is not None else max(1, cfg.deepspeed.global_batch // cfg.data.batch_size)
    if world < 1 or args.gpus_per_node < 1 or not 0 < args.mfu <= 1:
        raise ConfigError("--gpus and --gpus-per-node must be positive and --mfu in (0, 1]: e.g. --gpus 64 --mfu 0.4")
    return Cluster(gpu, world, args.gpus_per_node, args.mfu, args.intra_node_gbps, args.inter_node_gbps)


def _plan(argv: list[str] | None) -> int:
    args = parse(argv)
    if args.paper_table:
        print(paper_table(PretrainConfig, simmim_recipe, classifier_recipe))
        return 0
    if not args.config:
        raise ConfigError("no config given: pass --config configs/simmim/swinv2_base_192.yaml (or another YAML)")
    cfg = load(args.config, args.overrides)
    cluster = cluster_for(args, cfg)
    plan = plan_config(cfg, recipe_for, cluster)
    print(describe(plan, cluster, f"{args.config} ({'pretraining' if is_pretraining(cfg) else 'fine-tuning'})"))
    out = plan.to_dict()
    if args.search or plan.max_micro_batch == 0:
        plans = search(cfg, recipe_for, cluster)
        best = fastest(plans)
        if best is None:  # no setting fits: the user's to change (memory, GPUs or model), so exit 2
            least = min(plans, key=lambda p: p.per_rank_bytes["total"])
            raise ConfigError(cannot_fit(with_setting(cfg), least, cluster))
        if args.search:
            print(search_table(plans, best))
        print(f"fastest setting that fits: {setting(best)}, {gib(best.per_rank_bytes['total'])} per rank, "
              f"step {best.step_seconds:.2f} s")
        out["best"] = best.to_dict()
    if args.json:
        print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``swinv2-plan`` / ``launch/plan.py``: the exit status (2 for a user error or a config that cannot fit)."""
    return run_command(_plan, argv)
