"""Activation memory of one micro batch: the tensors autograd saves for the backward pass, counted exactly.

The forward runs the real model (every module's own forward) under ``saved_tensors_hooks``; every tensor autograd
saves is recorded by its storage, so views and tensors saved by several operators count once, and parameters and
buffers (model states, not activations) are left out. With activation checkpointing (non-reentrant) the
checkpoint saves each block's inputs through the same hook and nothing inside the block, which is exactly what it
keeps. Run on fake tensors (:func:`swinv2.plan.fake.fake_cuda`) this costs no memory; run on real tensors it
counts a real forward (the tests compare the two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model import SwinBlock


@dataclass
class SavedTensors:
    """Bytes saved for backward by one forward: in total, and per Swin block (``blocks[i]``, in forward order).

    ``largest`` is the largest single tensor the block's backward holds at once (per block in ``block_largest``):
    the largest saved storage, or the gradient of a bias that the attention saved as a broadcast view, whichever
    is larger. The GPU's memory-efficient SDPA kernel writes that gradient at the full broadcast size,
    ``(windows x batch, heads, N, N)`` per call, before reducing it (so ``attn_chunk_size`` bounds it).
    """

    total: int = 0
    blocks: list[int] = field(default_factory=list)
    block_largest: list[int] = field(default_factory=list)
    largest: int = 0


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


def broadcast_grad_bytes(t: torch.Tensor) -> int:
    """Bytes of the gradient of a saved tensor that needs one, when that gradient is written at the tensor's full
    (broadcast) size: more than the storage it views. 0 otherwise."""
    full = t.numel() * t.element_size()
    return full if t.requires_grad and full > t.untyped_storage().nbytes() else 0


def count_saved(model: nn.Module, forward: Callable[[nn.Module], torch.Tensor]) -> SavedTensors:
    """Run ``forward(model)`` (to the loss) and count the storages autograd keeps for the backward pass."""
    states = {_storage_key(t)[0] for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    current: list[int | None] = [None]
    per_block: dict[int, dict[int, int]] = {}
    grad_peak: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if current[0] is not None:
            grad_peak[current[0]] = max(grad_peak.get(current[0], 0), broadcast_grad_bytes(t))
        if key not in states and key not in seen:
            seen[key] = nbytes
            if current[0] is not None:
                per_block.setdefault(current[0], {})[key] = nbytes
        return t

    blocks = [m for m in model.modules() if isinstance(m, SwinBlock)]
    order: list[int] = []

    def enter(index: int):
        def hook(module, args):
            current[0] = index
            if index not in order:
                order.append(index)
        return hook

    def leave(module, args, output):
        current[0] = None

    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(leave) for b in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward(model)
        del loss
    finally:
        for h in handles:
            h.remove()
    block_bytes = [sum(per_block.get(i, {}).values()) for i in order]
    block_largest = [max(*per_block.get(i, {0: 0}).values(), grad_peak.get(i, 0)) for i in order]
    return SavedTensors(sum(seen.values()), block_bytes, block_largest, max(seen.values(), default=0))
