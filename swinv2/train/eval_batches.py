"""Batches of an evaluation stream when ranks hold different numbers of them.

The evaluation stream gives each rank its own shards, so ranks see different numbers of samples and batches.
Each rank therefore sums its metrics locally and the sums are all-reduced once at the end; a collective per batch
would hang the rank that still has batches. The exception is a model whose forward is itself collective (ZeRO-3
gathers parameters layer by layer): ``lockstep=True`` makes the ranks agree each batch on whether any rank still
has data, and ranks that ran dry take part with a dummy batch whose outputs are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    """``t`` reduced in place over the process group (sum unless ``op``); unchanged without one."""
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
            any_left = all_reduce(torch.tensor([float(batch is not None)], device=device),
                               torch.distributed.ReduceOp.MAX if torch.distributed.is_initialized() else None)
            if not any_left.item():
                return
            if batch is None:  # this rank ran dry: join the others' parameter gathers
                dry_forward()
                continue
        elif batch is None:
            return
        yield batch


def dummy_input(model: nn.Module, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One all-zero image of ``model.img_size`` (for a rank without data in a lockstep evaluation)."""
    size = getattr(model, "img_size", None)
    if size is None:
        raise ValueError("lockstep evaluation needs model.img_size for the dummy batch of a rank without data")
    h, w = (size, size) if isinstance(size, int) else size
    return torch.zeros(1, 3, h, w, device=device, dtype=dtype)
