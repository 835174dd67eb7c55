"""Top-1 / top-5 / loss of a classifier over a whole evaluation set, every sample counted exactly once across
ranks (:mod:`swinv2.train.eval_batches` explains how ranks with different numbers of batches stay in step)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..train.config import DTYPES
from ..train.eval_batches import all_reduce, dummy_input, lockstep_batches


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device | str, dtype: torch.dtype = torch.float32,
             lockstep: bool = False) -> dict[str, float]:
    """Evaluate ``model`` on every batch of ``loader`` (dicts with ``image`` and ``label``).

    Returns ``top1`` and ``top5`` (percent), ``loss`` (mean cross-entropy), ``count`` (samples over all ranks)
    and ``images_per_s`` (all ranks' samples over the slowest rank's time). Images are cast to ``dtype``, the
    dtype the model runs in. Top-5 is top-k with k = min(5, classes).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()  # also drops the V2 position-bias caches, which cannot see DeepSpeed's in-place updates
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, count
    start = time.perf_counter()
    try:
        for batch in lockstep_batches(loader, device, lockstep, lambda: model(dummy_input(model, device, dtype))):
            images = batch["image"].to(device, dtype, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            logits = model(images).float()  # (B, classes)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                 hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                                 torch.tensor(float(len(labels)), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    all_reduce(sums)
    all_reduce(elapsed, torch.distributed.ReduceOp.MAX if torch.distributed.is_initialized() else None)
    loss, top1, top5, count = sums.tolist()
    if count == 0:
        raise RuntimeError("the evaluation set is empty on every rank: check data.eval_urls (or --data)")
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss / count, "count": int(count),
            "images_per_s": count / max(elapsed.item(), 1e-9)}


def evaluate_checkpoint(checkpoint: str, urls: str, spec: dict, *, batch_size: int = 128, num_workers: int = 4,
                        crop_pct: float = 0.875, precision: str = "auto") -> tuple[dict[str, float], Any]:
    """Build the model ``spec`` describes, load ``checkpoint`` into it, evaluate on ``urls`` (on every rank of an
    initialised process group, each rank its share of the shards). Returns ``(metrics, load report)``."""
    from ..data import DataConfig, build_loader
    from .weights import check_head_loaded, create_from_spec, load_pretrained

    model = create_from_spec(spec)
    report = load_pretrained(model, checkpoint)
    check_head_loaded(report, checkpoint)
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    dtype = DTYPES[precision]
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    model.to(device=device, dtype=dtype)
    size = spec["options"].get("img_size", model.img_size)
    cfg = DataConfig(eval_urls=urls, batch_size=batch_size, num_workers=num_workers, crop_pct=crop_pct)
    loader = build_loader(cfg, "eval", img_size=size if isinstance(size, int) else size[0], setting="--data")
    return evaluate(model, loader, device, dtype), report
