"""k-nearest-neighbour probe of an encoder's features: a cheap monitor of representation quality during
self-supervised pretraining (weighted kNN, Wu et al. 2018, arXiv 1805.01978 sec. 3.4; as used by DINO,
arXiv 2104.14294 sec. 4.1).

Features are L2-normalised; each query takes its ``k`` most cosine-similar training features, each of which votes
for its label with weight ``exp(similarity / temperature)``; the label with the largest sum wins (ties go to the
lower class index). Masked image models probe far worse than they fine-tune (SimMIM arXiv 2111.09886;
MAE arXiv 2111.06377 sec. 4.3), so watch the trend of this number, not its level.

Across ranks: every rank extracts features for its share of the labelled shards (the exact evaluation streams), the
training features are gathered to every rank in rank order, each rank classifies its own queries, and the hit
counts are summed, so the result is the same on any number of ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .eval_batches import dummy_input, lockstep_batches


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int | None = None,
                k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Predicted labels ``(Q,)`` of ``queries`` ``(Q, D)`` from ``bank`` ``(N, D)`` with labels ``(N,)``
    (``num_classes``: ``None`` for the bank's largest label + 1)."""
    if bank.shape[0] == 0:
        raise ValueError("the kNN probe's training set is empty: check probe.train_urls")
    num_classes = int(bank_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, bank.shape[0])
    bank, queries = F.normalize(bank.double(), dim=1), F.normalize(queries.double(), dim=1)
    similarity, index = (queries @ bank.T).topk(k, dim=1)  # (Q, k)
    votes = torch.zeros(queries.shape[0], num_classes, dtype=torch.float64, device=queries.device)
    votes.scatter_add_(1, bank_labels[index], (similarity / temperature).exp())
    return votes.argmax(dim=1)


@torch.no_grad()
def pooled_features(encoder: nn.Module, loader: Any, device: torch.device, dtype: torch.dtype,
                    lockstep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(features (N, C) float32, labels (N,))``: the encoder's final-norm tokens, averaged over space."""
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    try:
        def dry_forward() -> None:
            encoder.forward_features(dummy_input(encoder, device, dtype))

        for batch in lockstep_batches(loader, device, lockstep, dry_forward):
            images = batch["image"].to(device, dtype, non_blocking=True)
            features.append(encoder.forward_features(images).float().mean(dim=(1, 2)))
            labels.append(batch["label"].to(device))
    finally:
        encoder.train(was_training)
    if not features:
        width = getattr(encoder, "num_features", 0)
        return torch.zeros(0, width, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(labels)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``t`` concatenated in rank order (ranks may hold different row counts)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    world = torch.distributed.get_world_size()
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor,
             num_classes: int | None = None, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Top-1 (percent) and query count over all ranks; ``bank``/``queries`` are this rank's rows."""
    bank, bank_labels = gather_rows(bank), gather_rows(bank_labels)
    hits = torch.zeros(2, dtype=torch.float64, device=queries.device)
    if queries.shape[0]:
        predicted = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
        hits += torch.tensor([float((predicted == labels).sum()), float(queries.shape[0])], dtype=torch.float64,
                             device=queries.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(hits)
    correct, count = hits.tolist()
    if count == 0:
        raise ValueError("the kNN probe's evaluation set is empty on every rank: check probe.eval_urls")
    return {"top1": 100.0 * correct / count, "count": int(count)}


def knn_probe(encoder: nn.Module, train_loader: Any, eval_loader: Any, device: torch.device, dtype: torch.dtype,
              num_classes: int | None = None, k: int = 20, temperature: float = 0.07,
              lockstep: bool = False) -> dict[str, float]:
    """kNN top-1 of ``encoder``'s pooled features: ``train_loader`` is the labelled bank, ``eval_loader`` the
    queries (both evaluation streams: every sample once across ranks)."""
    bank, bank_labels = pooled_features(encoder, train_loader, device, dtype, lockstep)
    queries, labels = pooled_features(encoder, eval_loader, device, dtype, lockstep)
    return knn_top1(bank, bank_labels, queries, labels, num_classes, k, temperature)
