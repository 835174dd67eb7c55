"""Input pipeline speed for SimMIM at 192 px: our webdataset loader on re-encoded shards against a plain
torchvision ImageFolder on the original files, with the same transforms, in one run.

Both sides run the same per-image transform, ``simmim.PretrainTransform`` (RandomResizedCrop(192, scale 0.67-1,
ratio 3/4-4/3), horizontal flip, uint8 pixels, and a random SimMIM mask: 32 px mask patches, ratio 0.6; the
ImageNet normalisation runs on the training device, outside the loader) in the same number of DataLoader
worker processes. Ours reads tar shards re-encoded by ``make_shards --resize``; the
baseline reads the original JPEGs (synthetic ImageNet-like photos, ~500x375, generated here). Rounds are
interleaved (ours, baseline, ours, ...) and the median steady-state rate (from the first batch to the last)
is kept, so background load hits both sides alike.

    python benchmarks/loader_speed.py --images 400 --resize 256 --workers 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets

from simmim import MaskGenerator, PretrainTransform
from swinv2.data import DataConfig, build_loader, write_shards


def make_photos(folder: Path, count: int, long_side: int = 500, seed: int = 0) -> int:
    """ImageNet-like JPEGs (long side 500, short 330-375 as most ImageNet photos; smooth structure plus fine
    texture; quality 90; one in four portrait) in 4 class folders. Returns their total size in bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        short = int(rng.integers(long_side * 33 // 50, long_side * 3 // 4 + 1))
        w, h = (long_side, short) if i % 4 else (short, long_side)
        coarse = rng.integers(0, 256, size=(h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.int16)
        pixels = np.clip(base + rng.normal(0, 18, size=(h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"class{i % 4}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        total += path.stat().st_size
    return total


def rate(loader, batch_size: int) -> float:
    """Images/s from the first batch to the last (worker start-up and the first batch are excluded)."""
    seen, start = 0, None
    for batch in loader:
        images = batch["image"] if isinstance(batch, dict) else batch[0][0]
        if start is None:
            start = time.perf_counter()
        else:
            seen += len(images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--long-side", type=int, default=500, help="long side of the original photos")
    parser.add_argument("--resize", type=int, default=256, help="shorter side of the re-encoded shards")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes on each side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transform = PretrainTransform(192, MaskGenerator(192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6))

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "photos"
        original_bytes = make_photos(src, args.images, args.long_side)
        summary = write_shards(src, f"{tmp}/shards/train-%06d.tar", resize=args.resize, quality=90,
                               max_samples=100, workers=2, progress=False)
        cfg = DataConfig(train_urls=f"{tmp}/shards", batch_size=args.batch, num_workers=args.workers,
                         samples_per_epoch=args.images, shuffle_buffer=500)
        ours = build_loader(cfg, "pretrain", transform=transform, rank=0, world_size=1, img_size=192)
        folder = datasets.ImageFolder(str(src), transform=transform)
        baseline = torch.utils.data.DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                               drop_last=True)
        ours_rates, base_rates = [], []
        for _ in range(args.repeats):
            ours_rates.append(rate(ours, args.batch))
            base_rates.append(rate(baseline, args.batch))
    result = dict(images=args.images, long_side=args.long_side, workers=args.workers, resize=args.resize,
                  original_mb=original_bytes / 2**20, shard_mb=summary.bytes / 2**20,
                  ours_img_s=statistics.median(ours_rates), baseline_img_s=statistics.median(base_rates))
    result["ratio"] = result["ours_img_s"] / result["baseline_img_s"]
    per = max(args.workers, 1)
    print(f"{args.images} photos, long side {args.long_side} ({result['original_mb']:.1f} MB) -> shards at "
          f"{args.resize} px ({result['shard_mb']:.1f} MB); {args.workers} worker(s), batch {args.batch}, "
          f"median of {args.repeats}")
    print(f"ours (webdataset shards):   {result['ours_img_s']:7.1f} img/s  "
          f"({result['ours_img_s'] / per:.1f} per worker)")
    print(f"ImageFolder (originals):    {result['baseline_img_s']:7.1f} img/s  "
          f"({result['baseline_img_s'] / per:.1f} per worker)")
    print(f"ratio: {result['ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
