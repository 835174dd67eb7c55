"""Fast in-process SimMIM pretraining of the demo encoder, for searching what makes the demo's pretraining pay off
(benchmarks/RESULTS.md, "Does SimMIM pretraining pay off on the demo?").

Not the framework's launcher: the demo images decoded once (``simmim_diagnosis.demo_pixels``: random 64 px crops
of 72 px images, flips), ``simmim.SimMIM`` on the demo encoder, AdamW over ``swinv2.train.optim.param_groups``
(weight decay 0.05, no layer decay), 10 % warmup then cosine, clipping 5, batch 16, one thread. Prints the training
loss, the blocks' mean post-norm gain |w| and a kNN probe (k 20, T 0.07, pooled final features, ``demo:train`` bank,
``demo:val`` queries) every ``--every`` steps; saves the encoder as ``runs/inprocess/<name>.safetensors``, which
``benchmarks/simmim_diagnosis.py --init`` fine-tunes.

    OMP_NUM_THREADS=1 python benchmarks/simmim_inprocess.py --name v2_norm --norm 15 --steps 750
    OMP_NUM_THREADS=1 python benchmarks/simmim_inprocess.py --name plain --steps 3000           # plain target
    ... --version v1      # a pre-norm Swin V1 encoder of the same shape
    ... --gray            # grey images (one contrast sign in all channels)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simmim_diagnosis import DEMO, demo_pixels, normalise, random_batch, set_lr  # noqa: E402

import swinv2  # noqa: E402
from simmim import MaskGenerator, SimMIM  # noqa: E402
from swinv2.train.knn import knn_predict  # noqa: E402
from swinv2.train.optim import param_groups  # noqa: E402

NAMES = {"v2": "swinv2_tiny_window8_256", "v1": "swin_tiny_patch4_window7_224"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the encoder is saved as runs/inprocess/<name>.safetensors")
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--norm", type=int, default=0, help="normalised-target window (0: plain pixels)")
    parser.add_argument("--mask-patch", type=int, default=16)
    parser.add_argument("--version", choices=sorted(NAMES), default="v2")
    parser.add_argument("--gray", action="store_true")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = demo_pixels(gray=args.gray)
    (train_x, train_y), (val_x, val_y) = data["train"], data["val"]
    encoder = swinv2.create_model(NAMES[args.version], **{**DEMO, "num_classes": 0})
    model = SimMIM(encoder, args.norm or None)
    groups = param_groups(model, 0.05, 1.0)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=args.lr)
    masks = MaskGenerator(64, args.mask_patch, 4, 0.6)
    gen = torch.Generator().manual_seed(args.seed + 7)

    def knn_top1() -> float:
        encoder.eval()
        with torch.no_grad():
            bank = torch.cat([encoder.forward_features(normalise(train_x[i:i + 250, :, 4:68, 4:68])).mean((1, 2))
                              for i in range(0, len(train_x), 250)])
            queries = torch.cat([encoder.forward_features(normalise(val_x[i:i + 250])).mean((1, 2))
                                 for i in range(0, len(val_x), 250)])
        encoder.train()
        return 100 * (knn_predict(bank, train_y, queries, 10) == val_y).float().mean().item()

    def post_norm_gain() -> float:
        gains = [m.weight.abs().mean().item() for n, m in encoder.named_modules() if n.endswith(("norm1", "norm2"))]
        return sum(gains) / len(gains)

    losses, start = [], time.time()
    print(f"{args.name} step 0 kNN {knn_top1():.1f}", flush=True)
    for step in range(1, args.steps + 1):
        set_lr(optimizer, args.lr, step, args.steps)
        _, images = random_batch(train_x, 16, gen)
        mask = torch.stack([masks(generator=gen) for _ in range(16)])
        loss = model(normalise(images), mask)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        losses.append(loss.item())
        if step % args.every == 0 or step == args.steps:
            print(f"{args.name} step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                  f"gain {post_norm_gain():.4f} kNN {knn_top1():.1f} ({time.time() - start:.0f} s)", flush=True)
    from safetensors.torch import save_file

    out = Path("runs/inprocess")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(out / f"{args.name}.safetensors"))


if __name__ == "__main__":
    main()
