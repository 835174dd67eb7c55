"""Helper for tests/test_pretrain_dist.py (run as a script, under ``python`` or ``deepspeed --num_gpus N``).

Trains the tiny SimMIM model of the demo config with our real DeepSpeed engine (``build_engine``: our AdamW,
parameter groups, schedule and clipping) on one fixed synthetic global batch per step, identical in every
process: rank r takes the contiguous slice r of it, cut into micro batches for gradient accumulation. The shard
streams of the real loader differ per rank, so they could not give the same curve on 1 and 2 processes; this does.

    python tests/helpers/pretrain_parity.py --out one.json --runs 1:8
    deepspeed --num_gpus 2 tests/helpers/pretrain_parity.py --out two.json --runs 2:4,3:2

``--runs`` lists ``zero_stage:micro_batch`` pairs, trained one after the other (fresh model and engine each).
Rank 0 writes ``{"zero<stage>_micro<m>": {"losses": [...], "lrs": [...], "grad_norms": [...], ...}}``: per
optimizer step the loss averaged over all micro batches of all ranks, the LR that step applied and the global
gradient norm. ``--checkpoint DIR`` also saves the
last run's engine with our ``CheckpointManager`` under ``DIR/checkpoints`` and its live (gathered) weights as
``DIR/live.safetensors``, for the export test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from simmim.config import PretrainConfig  # noqa: E402
from simmim.masking import MaskGenerator  # noqa: E402
from simmim.pretrain import build_simmim  # noqa: E402
from swinv2.files import save_safetensors  # noqa: E402
from swinv2.train.checkpoint_manager import CheckpointManager  # noqa: E402
from swinv2.train.config import load_config  # noqa: E402
from swinv2.train.engine import accumulation_steps, build_engine, init_distributed  # noqa: E402

GLOBAL_BATCH = 8
# Small and fast, but every code path of the real model: 4 stages, shifted windows, patch merging.
TINY = ["model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "deepspeed.precision=fp32",
        f"deepspeed.global_batch={GLOBAL_BATCH}", "optim.base_lr=4e-3", "schedule.epochs=1",
        "schedule.warmup_epochs=0.25", "data.eval_urls=''", "probe.train_urls=''", "probe.eval_urls=''"]


def fixed_batches(steps: int, img_size: int, mask_generator: MaskGenerator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``steps`` global batches in every process, whatever its rank or world size."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        # Smooth-ish images (a low-resolution noise upsampled) so the masked pixels are predictable from context.
        low = torch.randn(GLOBAL_BATCH, 3, img_size // 8, img_size // 8, generator=gen)
        images = torch.nn.functional.interpolate(low, size=img_size, mode="bilinear", align_corners=False)
        masks = torch.stack([mask_generator(generator=gen) for _ in range(GLOBAL_BATCH)])
        out.append((images, masks))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True, help="comma-separated zero_stage:micro_batch pairs")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--clip", type=float, default=0.3, help="low enough that clipping acts on most steps")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher adds it
    args = parser.parse_args()

    rank, world = init_distributed()
    results = {}
    for run in args.runs.split(","):
        stage, micro_batch = (int(x) for x in run.split(":"))
        overrides = [f"deepspeed.zero_stage={stage}", f"data.batch_size={micro_batch}", f"optim.clip_grad={args.clip}"]
        if stage == 3:
            # ZeRO-3 keeps parameters under 1e5 elements whole by default, which is every one of this tiny model;
            # threshold 0 partitions them all, so every parameter goes through DeepSpeed's gather and release as it
            # would for a large model (SimMIM's mask token, used outside a module's forward, is gathered explicitly).
            extra = Path(tempfile.gettempdir()) / f"zero3_partition_all_{os.getpid()}.json"
            extra.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
            overrides.append(f"deepspeed.extra_json={extra}")
        cfg = load_config(PretrainConfig, ROOT / "configs" / "demo.yaml", TINY + overrides)
        accumulation = accumulation_steps(GLOBAL_BATCH, micro_batch, world)
        torch.manual_seed(cfg.run.seed)  # same initial weights in every process and every run
        model = build_simmim(cfg)
        masks = MaskGenerator(cfg.model.img_size, cfg.simmim.mask_patch_size, model.patch_size, cfg.simmim.mask_ratio)
        batches = fixed_batches(args.steps, cfg.model.img_size, masks)
        # The schedule spans exactly these steps (one "epoch"), so warmup and cosine decay both happen.
        engine = build_engine(model, cfg, world, steps_per_epoch=args.steps)
        # ZeRO-3 outside a forward: each rank's parameters are empty placeholders for their partitions
        all_partitioned = all(p.numel() == 0 for p in engine.module.parameters())
        per_rank = GLOBAL_BATCH // world
        losses, lrs, grad_norms = [], [], []
        for images, mask in batches:
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            images, mask = images[mine], mask[mine]
            total = 0.0
            lrs.append(max(engine.get_lr()))
            for a in range(accumulation):
                micro = slice(a * micro_batch, (a + 1) * micro_batch)
                loss = engine(images[micro], mask[micro])
                engine.backward(loss)
                engine.step()
                total += loss.item()
            mean = torch.tensor(total / accumulation, dtype=torch.float64)
            torch.distributed.all_reduce(mean)
            losses.append(mean.item() / world)
            grad_norms.append(float(engine.get_global_grad_norm()))  # before clipping, over all partitions
        results[f"zero{stage}_micro{micro_batch}"] = {"losses": losses, "lrs": lrs, "grad_norms": grad_norms,
                                                      "world_size": world, "accumulation": accumulation,
                                                      "all_partitioned": all_partitioned}

    if args.checkpoint:  # the last run's engine: a real (possibly ZeRO-3 partitioned) checkpoint + its live weights
        out = Path(args.checkpoint)
        CheckpointManager(out / "checkpoints", keep_last=1, rank=rank).save(
            engine, args.steps, {"step": args.steps, "data_epoch": 1, "wandb_id": None, "config": {}, "data_seed": 0})
        params = list(engine.module.parameters())
        partitioned = any(hasattr(p, "ds_id") for p in params)  # ZeRO-3: each rank holds a slice of every tensor
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=partitioned):
            live = {name: p.detach().clone().float() for name, p in engine.module.named_parameters()}
        if rank == 0:
            save_safetensors(live, out / "live.safetensors")
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
