"""Memory of the attention-bias path at SwinV2-G scale, counted on fake CUDA tensors (no GPU, no memory).

The position bias, the shift masks and everything built from them do not depend on the batch: they are the
``fixed`` part of the bytes a forward saves for its backward (fitted from batches 1 and 2,
:mod:`swinv2.plan.measure`), plus the buffers every block holds. Counted on the real forward of the model in bf16
(parameters cast as DeepSpeed casts them), without activation checkpointing, so that it is the whole forward's
worth; ``largest`` is the largest single tensor saved, the size a checkpointed block's recompute holds at once.

    python benchmarks/bias_memory.py --img 1536 --window 32
    python benchmarks/bias_memory.py --img 640 --window 40

Run the same script with ``PYTHONPATH`` on an older checkout to get the before figures (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import json

import torch

import swinv2
from swinv2.flops import fake_cuda
from swinv2.plan.activations import count_saved

GIB = 2**30


def bias_path(name: str, img: int, window: int) -> dict:
    """Batch-independent saved bytes of one forward, per-block buffers, and the largest saved tensor (GiB)."""
    with torch.random.fork_rng(devices=[]), fake_cuda():
        model = swinv2.create_model(name, img_size=img, window_size=window).train()
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        counts = [count_saved(model, lambda m, b=b: m.forward_features(torch.empty(b, 3, img, img,
                                                                                  dtype=torch.bfloat16)).sum())
                  for b in (1, 2)]
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    one, two = counts
    return {"model": name, "img": img, "window": window,
            "fixed_saved_gib": round((2 * one.total - two.total) / GIB, 2),
            "per_image_saved_gib": round((two.total - one.total) / GIB, 2),
            "buffers_gib": round(buffers / GIB, 2),
            "largest_saved_gib_batch1": round(one.largest / GIB, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swinv2_giant_window12_192")
    parser.add_argument("--img", type=int, default=1536)
    parser.add_argument("--window", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(bias_path(args.model, args.img, args.window)))


if __name__ == "__main__":
    main()
