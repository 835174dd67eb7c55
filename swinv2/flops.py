"""Exact model FLOPs of a forward pass, for model FLOPs utilisation (MFU) and the memory/speed planner.

Counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add of every matmul, convolution and
attention product the forward actually runs), so padding to window multiples, clipped windows, the V2 position-bias
MLP and the SimMIM decoder are all included; norms, softmax and element-wise ops are not (as in the hand count of
the Swin paper, arXiv 2103.14030 sec. 3.2 eq. 1-2). :func:`image_flops` counts on meta tensors (no memory), so it
takes seconds for SwinV2-G at 1536 px. MFU = 3 x forward FLOPs (forward + backward, activation recomputation not
counted) / step time / peak FLOP/s.

:func:`fake_cuda` makes tensors fake CUDA tensors (PyTorch's ``FakeTensorMode``: meta kernels, no storage), so every
device-dependent branch of the model takes the path a GPU takes. Without a GPU, ``scaled_dot_product_attention`` would
fall back to its math path, which keeps every attention map. A GPU picks the memory-efficient kernel for a float
``attn_mask`` (flash attention takes no mask), which keeps only q, k, v, the mask, the output and a log-sum-exp per
row; inside :func:`fake_cuda` SDPA calls go to that kernel's own operator, so its meta kernel and autograd node decide
what is saved, as on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from .model import SwinBlock


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass: in total and inside the Swin blocks (what activation checkpointing recomputes)."""

    total: int
    blocks: int


@dataclass(frozen=True)
class ImageFlops:
    """Forward FLOPs as ``per_image * batch + fixed`` (``fixed``: the V2 position-bias MLPs, run once per forward);
    ``block_per_image`` and ``block_fixed`` likewise for the Swin blocks alone."""

    per_image: int
    fixed: int
    block_per_image: int
    block_fixed: int

    def forward(self, batch: int) -> int:
        return self.per_image * batch + self.fixed

    def recompute(self, batch: int) -> int:
        return self.block_per_image * batch + self.block_fixed


def count_flops(model: nn.Module, run: Callable[[nn.Module], Any]) -> tuple[FlopCount, Any]:
    """FLOPs of ``run(model)`` (a forward, e.g. to the loss) and its result."""
    inside = [0]
    with FlopCounterMode(display=False) as counter:
        start: list[int] = []

        def enter(module, args):
            start.append(counter.get_total_flops())

        def leave(module, args, output):
            inside[0] += counter.get_total_flops() - start.pop()

        blocks = [m for m in model.modules() if isinstance(m, SwinBlock)]
        handles = [b.register_forward_pre_hook(enter) for b in blocks]
        handles += [b.register_forward_hook(leave) for b in blocks]
        try:
            result = run(model)
        finally:
            for h in handles:
                h.remove()
    return FlopCount(counter.get_total_flops(), inside[0]), result


def image_flops(build: Callable[[], nn.Module], forward: Callable[[nn.Module, int], Any]) -> ImageFlops:
    """Forward FLOPs per image of the model ``build()`` makes, with ``forward(model, batch)`` running one batch.

    Counted on meta tensors (no memory, no GPU; attention through the GPU's memory-efficient kernel, as in
    :func:`fake_cuda`) at batch 1 and 2; the difference is the per-image part. Meta tensors give the same counts as
    fake CUDA tensors in about half the time, which every training process pays at start-up.
    E.g. ``image_flops(lambda: swinv2.create_model(name), lambda m, b: m(torch.empty(b, 3, 256, 256)))``.
    """
    # fork_rng: building the model draws its initial weights; the caller's random stream must not move.
    with torch.random.fork_rng(devices=[]), torch.device("meta"), _GpuAttentionKernel():
        model = build()
        one, _ = count_flops(model, lambda m: forward(m, 1))
        two, _ = count_flops(model, lambda m: forward(m, 2))
    return ImageFlops(two.total - one.total, 2 * one.total - two.total, two.blocks - one.blocks,
                      2 * one.blocks - two.blocks)


class _GpuAttentionKernel(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` -> the memory-efficient kernel a GPU runs for a masked attention."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if mask is not None:
            mask = mask.expand(*q.shape[:-1], k.shape[-2])  # a broadcast view, as PyTorch's CUDA dispatch makes
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, grad, kwargs.get("dropout_p", 0.0), False, scale=kwargs.get("scale"))[0]


@contextmanager
def fake_cuda() -> Iterator[None]:
    """Tensors created inside are fake CUDA tensors (meta kernels, no storage, no GPU needed); attention runs
    through the GPU's memory-efficient SDPA kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.device("cuda"), _GpuAttentionKernel():
        yield
