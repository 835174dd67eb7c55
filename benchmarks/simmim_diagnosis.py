"""Fast in-process fine-tune of the demo classifier at 64 px / window 4, for diagnosing why SimMIM pretraining does
not pay off on the demo (benchmarks/RESULTS.md, "Does SimMIM pretraining pay off on the demo?").

Not the framework's launcher: plain AdamW with the demo recipe's shape (LR with layer decay from
``swinv2.train.optim.param_groups``, 10 % warmup then cosine, label smoothing 0.1, clipping 5), images decoded once
and cached in ``runs/diagnosis_data_v<demo version>.pt``, crop + flip augmentation in torch, one thread. Prints top-1 on
``demo:val`` at four points of the run.

    OMP_NUM_THREADS=1 python benchmarks/simmim_diagnosis.py --steps 400                     # from scratch
    OMP_NUM_THREADS=1 python benchmarks/simmim_diagnosis.py --steps 400 --init runs/demo     # from a pretraining
    ... --init runs/demo --reset cpb_mlp,norm1,norm2    # those tensors back to their initial values
    ... --init runs/demo --perturb                       # init + a random change of the pretraining's size
    ... --init runs/inprocess/v2_norm.safetensors --per-class 30   # an in-process pretraining, 30 labels per class
    ... --gray                                           # every image in grey (the same in all three channels)
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import swinv2  # noqa: E402
from swinv2.data import demo  # noqa: E402
from swinv2.finetune.weights import load_pretrained  # noqa: E402
from swinv2.train.optim import param_groups  # noqa: E402

CACHE = Path(f"runs/diagnosis_data_v{demo.VERSION}.pt")  # the demo set's version: v1 and v2 differ
DEMO = dict(img_size=64, window_size=4, embed_dim=32, depths=[2, 2, 4, 2], num_heads=[2, 4, 8, 16], num_classes=10)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> ImageNet-normalised float32."""
    return (images.float() / 255 - MEAN) / STD


def set_lr(optimizer: torch.optim.Optimizer, lr: float, step: int, steps: int) -> None:
    """10 % linear warmup, then cosine to zero (floored at 1e-6), times each group's layer-decay scale."""
    warmup = max(1, steps // 10)
    factor = step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = max(1e-6, lr * factor) * group["lr_scale"]


def random_batch(images: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, crops)``: ``size`` images drawn with replacement, one random 64 px crop offset, half flipped."""
    index = torch.randint(len(images), (size,), generator=gen)
    dx, dy = torch.randint(0, 9, (2,), generator=gen).tolist()
    crops = images[index][:, :, dy:dy + 64, dx:dx + 64]
    if torch.rand(1, generator=gen).item() < 0.5:
        crops = crops.flip(3)
    return index, crops


def demo_pixels(gray: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """uint8 train images at 72 px (random 64 px crops) and val images at 64 px (centre crop), with labels."""
    if gray:
        return {split: (x.float().mean(1, keepdim=True).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous(), y)
                for split, (x, y) in demo_pixels().items()}
    if CACHE.is_file():
        return torch.load(CACHE, weights_only=True)  # our own cache
    import webdataset as wds

    from swinv2.data import demo_shards

    data = {}
    for split, size in (("train", 72), ("val", 64)):
        images, labels = [], []
        for sample in wds.WebDataset(getattr(demo_shards(), f"{split}_urls"), shardshuffle=False):
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            scale = size / min(image.size)
            image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)
            left, top = (image.width - size) // 2, (image.height - size) // 2
            pixels = np.asarray(image.crop((left, top, left + size, top + size)))
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
            labels.append(int(sample["cls"]))
        data[split] = (torch.stack(images), torch.tensor(labels))
    CACHE.parent.mkdir(exist_ok=True)
    torch.save(data, CACHE)
    return data


def starting_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = swinv2.create_model("swinv2_tiny_window8_256", **DEMO)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    if not args.init:
        return model
    load_pretrained(model, args.init)
    state = model.state_dict()
    if args.perturb:  # the same per-tensor size of change as the pretraining's, in a random direction
        gen = torch.Generator().manual_seed(99)
        for k, v in state.items():
            if v.dtype.is_floating_point and v.numel() > 1:
                change = (v - initial[k]).pow(2).mean().sqrt()
                state[k] = initial[k] + torch.randn(v.shape, generator=gen) * change
    for k in state:
        if args.reset and any(part in k for part in args.reset.split(",")):
            state[k] = initial[k]
    model.load_state_dict(state)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="", help="pretraining run directory or weights file (default: from scratch)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--layer-decay", type=float, default=0.85)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reset", default="", help="comma-separated name parts of tensors to reset to their init")
    parser.add_argument("--perturb", action="store_true")
    parser.add_argument("--per-class", type=int, default=0, help="fine-tune on the first N labelled images per class")
    parser.add_argument("--gray", action="store_true", help="grey images (the mean of the channels, in all three)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = demo_pixels(gray=args.gray)
    (train_x, train_y), (val_x, val_y) = data["train"], data["val"]
    if args.per_class:
        keep = torch.cat([torch.nonzero(train_y == c).flatten()[:args.per_class] for c in range(10)])
        train_x, train_y = train_x[keep], train_y[keep]
    model = starting_model(args)
    groups = param_groups(model, 0.05, args.layer_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=args.lr)
    gen = torch.Generator().manual_seed(1000 + args.seed)

    def top1() -> float:
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(normalise(val_x[i:i + 250])).argmax(1) == val_y[i:i + 250]).sum())
                       for i in range(0, len(val_y), 250))
        model.train()
        return 100 * hits / len(val_y)

    start, curve = time.time(), []
    for step in range(1, args.steps + 1):
        set_lr(optimizer, args.lr, step, args.steps)
        index, images = random_batch(train_x, 32, gen)
        loss = F.cross_entropy(model(normalise(images)), train_y[index], label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step % (args.steps // 4) == 0:
            curve.append((step, round(loss.item(), 3), top1()))
    print(f"init={args.init or 'scratch'} reset={args.reset} perturb={args.perturb} lr={args.lr} seed={args.seed} "
          f"per_class={args.per_class or 'all'} gray={args.gray} "
          f"(step, loss, top-1)={curve} {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
