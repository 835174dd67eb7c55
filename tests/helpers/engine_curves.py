"""Helper for tests/test_compile_training.py and tests/test_precision_training.py (run as a script, under ``python``
or ``deepspeed --num_gpus N``): loss curves of the real engine under different settings, on the same data.

Trains the tiny SimMIM model of the demo config with ``swinv2.train.engine.build_engine`` (our AdamW, parameter groups,
schedule, clipping, DeepSpeed config, ``run.compile``) on fixed synthetic global batches, identical in every process
and every run: rank r takes slice r of each global batch, cut into micro batches for gradient accumulation. Each run
starts from the same initial weights, so two runs that differ only in one setting give comparable curves.

    python tests/helpers/engine_curves.py --out curves.json --run eager deepspeed.zero_stage=1 \\
        --run compiled deepspeed.zero_stage=1 run.compile=true
    deepspeed --num_gpus 2 tests/helpers/engine_curves.py --out two.json --run z2 \\
        deepspeed.zero_stage=2 data.batch_size=4

Each ``--run NAME OVERRIDE...`` is trained in turn (fresh model and engine). Rank 0 writes ``{NAME: {"losses": [...],
"grad_norms": [...], "accumulation": A, "world_size": W, "optimizer": class name, "grad_accum_dtype": ...,
"communication_dtype": ..., "seconds": [...]}}``: per optimizer step the loss averaged over every micro batch of
every rank, in float64, and the wall time of each step (the first includes compilation). ``--checkpoint DIR`` saves
each run's engine with our ``CheckpointManager`` under ``DIR/NAME/checkpoints``. ``--same-micro`` feeds every
accumulation step of a step the rank's same micro batch: with exact accumulation, N micro steps of it give the very
gradient of one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from simmim.config import PretrainConfig  # noqa: E402
from simmim.masking import MaskGenerator  # noqa: E402
from simmim.pretrain import build_simmim  # noqa: E402
from swinv2.train.checkpoint_manager import CheckpointManager  # noqa: E402
from swinv2.train.config import load_config  # noqa: E402
from swinv2.train.engine import accumulation_steps, build_engine, init_distributed  # noqa: E402

# Small and fast, but every code path of the real model: 4 stages, shifted windows, patch merging, 64 px.
TINY = ["model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "optim.base_lr=4e-3",
        "optim.lr_batch_reference=8", "schedule.warmup_epochs=0.1", "data.eval_urls=''", "probe.train_urls=''",
        "probe.eval_urls=''", "deepspeed.precision=fp32", "deepspeed.global_batch=8", "data.batch_size=8"]


def fixed_batches(steps: int, global_batch: int, img_size: int, masks: MaskGenerator) -> list:
    """The same ``steps`` global batches in every process and run: smooth images (low-resolution noise upsampled, so
    masked pixels are predictable from context) and SimMIM masks."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        low = torch.randn(global_batch, 3, img_size // 8, img_size // 8, generator=gen)
        images = torch.nn.functional.interpolate(low, size=img_size, mode="bilinear", align_corners=False)
        out.append((images, torch.stack([masks(generator=gen) for _ in range(global_batch)])))
    return out


def rank_batch(images: torch.Tensor, mask: torch.Tensor, rank: int, per_rank: int, device: torch.device | str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s slice of a global batch, on ``device`` (the engine's: DeepSpeed's forward does not move its
    inputs). The images stay float32, as the launcher passes them: SimMIM casts the encoder's copy to its dtype."""
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    return images[mine].to(device, torch.float32), mask[mine].to(device)


def train(cfg: PretrainConfig, steps: int, rank: int, world: int, checkpoint: Path | None,
          same_micro: bool = False) -> dict:
    accumulation = accumulation_steps(cfg.deepspeed.global_batch, cfg.data.batch_size, world)
    torch.manual_seed(cfg.run.seed)  # the same initial weights in every process and run
    model = build_simmim(cfg)
    masks = MaskGenerator(cfg.model.img_size, cfg.simmim.mask_patch_size, model.patch_size, cfg.simmim.mask_ratio)
    micro, per_rank = cfg.data.batch_size, cfg.deepspeed.global_batch // world
    if same_micro:  # every micro batch of a step is the rank's one micro batch (the same, whatever the accumulation)
        per_rank = micro
    batches = fixed_batches(steps, per_rank * world, cfg.model.img_size, masks)
    engine = build_engine(model, cfg, world, steps_per_epoch=steps)  # the schedule spans these steps
    losses, grad_norms, seconds = [], [], []
    for images, mask in batches:
        start = time.perf_counter()
        images, mask = rank_batch(images, mask, rank, per_rank, engine.device)
        total = torch.zeros((), dtype=torch.float64, device=engine.device)  # NCCL reduces only device tensors
        for a in range(accumulation):
            part = slice(0, micro) if same_micro else slice(a * micro, (a + 1) * micro)
            loss = engine(images[part], mask[part])
            engine.backward(loss)
            engine.step()
            total += loss.detach().double()
        torch.distributed.all_reduce(total)
        losses.append(float(total) / accumulation / world)
        grad_norms.append(float(engine.get_global_grad_norm()))
        seconds.append(time.perf_counter() - start)
    if checkpoint is not None:
        CheckpointManager(checkpoint / "checkpoints", keep_last=1, rank=rank).save(
            engine, steps, {"step": steps, "data_epoch": 1, "wandb_id": None, "config": {}, "data_seed": 0})
    return {"losses": losses, "grad_norms": grad_norms, "seconds": seconds, "accumulation": accumulation,
            "world_size": world, "optimizer": type(engine.optimizer).__name__,
            "grad_accum_dtype": engine.config.get("data_types", {}).get("grad_accum_dtype"),
            "communication_dtype": str(engine.communication_data_type),
            "compiled": bool(engine.is_compiled)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--run", nargs="+", action="append", required=True, metavar=("NAME", "OVERRIDE"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--checkpoint", default=None, help="save each run's engine under DIR/NAME")
    parser.add_argument("--same-micro", action="store_true",
                        help="repeat each rank's one micro batch for every accumulation step of a step")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher adds it
    args = parser.parse_args()

    rank, world = init_distributed()
    results = {}
    for name, *overrides in args.run:
        cfg = load_config(PretrainConfig, ROOT / "configs" / "demo.yaml", TINY + overrides)
        checkpoint = Path(args.checkpoint) / name if args.checkpoint else None
        results[name] = train(cfg, args.steps, rank, world, checkpoint, args.same_micro)
        torch._dynamo.reset()  # the next run compiles its own model
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
