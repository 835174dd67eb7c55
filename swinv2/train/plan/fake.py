"""Build a training config's model and one micro batch on fake tensors: shapes, dtypes and devices, no memory.

PyTorch's ``FakeTensorMode`` runs every operator's meta kernel, so a forward of SwinV2-G at 1536 px takes seconds
on a laptop and allocates nothing. The fake tensors report the device ``cuda``, so every device-dependent branch of
the model (the CPU-only attention kernel) takes the path a GPU takes; no GPU is needed.

Without a GPU, ``scaled_dot_product_attention`` would fall back to its math path, which keeps every attention map.
A GPU picks the memory-efficient kernel for a float ``attn_mask`` (flash attention takes no mask), which keeps
only q, k, v, the mask, the output and a log-sum-exp per row; inside :func:`fake_cuda` SDPA calls go to that
kernel's own operator, so its meta kernel and autograd node decide what is saved, as on the GPU.
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

from ..config import DTYPES


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


def cast_params(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters to ``dtype`` as DeepSpeed's bf16/fp16 engine does it (buffers keep their dtype), train mode."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.train()


def cast_buffers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Floating buffers to ``dtype``, as ``model.to(dtype)`` casts them. DeepSpeed's bf16/fp16 engine casts only
    the parameters, while the V2 position-bias MLP takes its coordinate table (a buffer) in the weights' dtype."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))
    return model


@dataclass(frozen=True)
class Recipe:
    """What the planner needs of a training config: the model as the run builds it and one micro batch's loss.

    ``build()`` returns the model (called inside :func:`fake_cuda`); ``loss(model, batch)`` makes a micro batch of
    ``batch`` images and returns the loss the training step back-propagates. Fine-tuning's is
    :func:`classifier_recipe`; SimMIM pretraining's lives in :mod:`simmim.plan` (simmim builds on swinv2, never
    the reverse).
    """

    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, int], torch.Tensor]
    img_size: int


def classifier_recipe(cfg: Any) -> Recipe:
    """A fine-tuning config's classifier, cast as DeepSpeed casts it, and its soft-target (Mixup) loss."""
    from timm.loss import SoftTargetCrossEntropy

    from ..weights import build_classifier

    dtype, size = DTYPES[cfg.deepspeed.precision], cfg.model.img_size
    criterion = SoftTargetCrossEntropy()

    def loss(model: nn.Module, batch: int) -> torch.Tensor:
        images = torch.empty(batch, 3, size, size, dtype=dtype)
        targets = torch.empty(batch, cfg.model.num_classes)
        return criterion(model(images).float(), targets)

    return Recipe(lambda: cast_params(build_classifier(cfg.model), dtype), loss, size)


def is_pretraining(cfg: Any) -> bool:
    """SimMIM pretraining configs have a ``simmim`` section; fine-tuning configs do not."""
    return hasattr(cfg, "simmim")
