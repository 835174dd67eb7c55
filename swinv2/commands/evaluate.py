"""Evaluate a classifier checkpoint: top-1, top-5, loss and images/s over a whole evaluation set.

    python launch/evaluate.py runs/finetune_demo/best.safetensors --data demo:val
    python launch/evaluate.py runs/finetune_demo --data demo:val            # newest DeepSpeed checkpoint of a run
    python launch/evaluate.py swinv2_base_patch4_window12to16_192to22kto1k_ft.pth --data 'val-{0000..0063}.tar' \\
        --model swinv2_base_window12to16_192to256 --num-classes 1000
    torchrun --nproc_per_node 8 launch/evaluate.py CHECKPOINT --data ...    # or deepspeed: shards split over ranks

CHECKPOINT is anything the fine-tuning loader takes (our run directory or DeepSpeed checkpoint, a safetensors or
.pth file in our, the authors' or timm's layout, a transformers checkpoint directory). The model comes from the
``model.json`` a fine-tuning run writes next to its checkpoints, or a transformers directory's ``config.json``;
``--model`` and the size options name or override it. Every sample is counted exactly
once across ranks, however unevenly the shards split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..files import write_text_atomic
from ..finetune.evaluation import evaluate_checkpoint
from ..finetune.weights import resolve_spec
from ..hf_layout import read_config
from ..train.consolidate import locate
from ..train.engine import init_distributed
from . import FILE_ERRORS, run_command


def _windows(text: str) -> list[int]:
    return [int(w) for w in text.split(",")]


def _evaluate(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="weights file, run directory or DeepSpeed checkpoint folder")
    parser.add_argument("--data", required=True, help="evaluation shards (brace pattern, folder, demo:val, a::b)")
    parser.add_argument("--model", help="swinv2.create_model name (default: the run's model.json)")
    parser.add_argument("--img-size", type=int, help="input size (also the centre crop)")
    parser.add_argument("--window", type=int, help="window size")
    parser.add_argument("--pretrained-windows", type=_windows, help="per-stage pretrained windows, e.g. 12,12,12,6")
    parser.add_argument("--num-classes", type=int, help="classes of the checkpoint's head")
    parser.add_argument("--batch", type=int, default=128, help="images per batch on each rank")
    parser.add_argument("--workers", type=int, default=4, help="data loader workers per rank")
    parser.add_argument("--crop-pct", type=float, default=0.875, help="resize to img_size / crop_pct, centre crop")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--json", help="also write the metrics to this JSON file (rank 0)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.data.strip():
        raise ValueError("--data is empty: pass the evaluation shards, e.g. --data demo:val, a folder of shards or "
                         "--data 'val-{0000..0063}.tar'")
    rank, world = init_distributed()
    if Path(args.checkpoint).is_dir() and read_config(args.checkpoint) is None:  # not a transformers directory
        locate(args.checkpoint)  # a folder without a complete checkpoint: say that before asking for --model
    spec = resolve_spec(args.checkpoint, args.model, img_size=args.img_size, window_size=args.window,
                        pretrained_window_sizes=args.pretrained_windows, num_classes=args.num_classes)
    metrics, report = evaluate_checkpoint(args.checkpoint, args.data, spec, batch_size=args.batch,
                                          num_workers=args.workers, crop_pct=args.crop_pct, precision=args.precision)
    if rank == 0:
        print(f"model {spec['name']} {json.dumps(spec['options'])}; checkpoint layout: {report.layout}")
        print(f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}  "
              f"images/s {metrics['images_per_s']:.1f}  ({metrics['count']} images, {world} rank(s))", flush=True)
        if args.json:
            write_text_atomic(args.json, json.dumps({**metrics, "model": spec, "world_size": world}, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``swinv2-evaluate`` / ``launch/evaluate.py``: the exit status (2 for a bad checkpoint, data or option)."""
    return run_command(_evaluate, argv, user_errors=FILE_ERRORS)
