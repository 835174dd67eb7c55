"""Top-1 / top-5 / loss over a whole evaluation set, every sample counted exactly once across ranks.

The evaluation stream gives each rank its own shards, so ranks see different numbers of samples and batches.
Each rank therefore sums loss, hits and count locally and the sums are all-reduced once at the end; a collective
per batch would hang the rank that still has batches. The exception is a model whose forward is itself
collective (ZeRO-3 gathers parameters layer by layer): ``lockstep=True`` makes the ranks agree each batch on
whether any rank still has data, and ranks that ran dry take part with a dummy batch whose outputs are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import DTYPES


def _reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


def lockstep_batches(loader: Any, device: torch.device, lockstep: bool, dry_forward: Callable[[], Any]
                     ) -> Iterator[dict]:
    """``loader``'s batches; with ``lockstep`` the ranks agree before each batch whether any rank still has one,
    and a rank that ran dry calls ``dry_forward()`` (a forward on a dummy input, outputs dropped) so that it joins
    the others' collectives (ZeRO-3 parameter gathers) until every rank is done."""
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if lockstep:
            any_left = _reduce(torch.tensor([float(batch is not None)], device=device),
                               torch.distributed.ReduceOp.MAX if torch.distributed.is_initialized() else None)
            if not any_left.item():
                return
            if batch is None:  # this rank ran dry: join the others' parameter gathers
                dry_forward()
                continue
        elif batch is None:
            return
        yield batch


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
    _reduce(sums)
    _reduce(elapsed, torch.distributed.ReduceOp.MAX if torch.distributed.is_initialized() else None)
    loss, top1, top5, count = sums.tolist()
    if count == 0:
        raise RuntimeError("the evaluation set is empty on every rank: check data.eval_urls (or --data)")
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss / count, "count": int(count),
            "images_per_s": count / max(elapsed.item(), 1e-9)}


def dummy_input(model: nn.Module, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One all-zero image of ``model.img_size`` (for a rank without data in a lockstep evaluation)."""
    size = getattr(model, "img_size", None)
    if size is None:
        raise ValueError("lockstep evaluation needs model.img_size for the dummy batch of a rank without data")
    h, w = (size, size) if isinstance(size, int) else size
    return torch.zeros(1, 3, h, w, device=device, dtype=dtype)


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
    loader = build_loader(cfg, "eval", img_size=size if isinstance(size, int) else size[0])
    return evaluate(model, loader, device, dtype), report
