"""Build a training config's model and one micro batch on fake tensors: shapes, dtypes and devices, no memory.

PyTorch's ``FakeTensorMode`` runs every operator's meta kernel, so a forward of SwinV2-G at 1536 px takes seconds
on a laptop and allocates nothing. The fake tensors report the device ``cuda``, so every device-dependent branch of
the model (the CPU-only attention kernel) takes the path a GPU takes; no GPU is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..finetune.config import FinetuneConfig
from ..train.config import DTYPES, TrainConfig


def cast_params(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters to ``dtype`` as DeepSpeed's bf16/fp16 engine does it (buffers keep their dtype), train mode."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.train()


def cast_buffers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Floating buffers to ``dtype``, as ``model.to(dtype)`` casts them. DeepSpeed's bf16/fp16 engine casts only
    the parameters (the V2 position-bias MLP computes in float32 either way: ``Float32Linear``); the model-state
    tests use this to compare buffer-cast and parameter-cast models."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))
    return model


@dataclass(frozen=True)
class Recipe:
    """What the planner needs of a training config: the model as the run builds it and one micro batch's loss.

    ``build()`` returns the model (called inside :func:`swinv2.flops.fake_cuda`); ``loss(model, batch)`` makes a
    micro batch of ``batch`` images and returns the loss the training step back-propagates. Fine-tuning's is
    :func:`classifier_recipe`; SimMIM pretraining's lives in :mod:`simmim.plan` (simmim builds on swinv2, never
    the reverse).
    """

    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, int], torch.Tensor]
    img_size: int


def classifier_recipe(cfg: FinetuneConfig) -> Recipe:
    """A fine-tuning config's classifier, cast as DeepSpeed casts it, and its soft-target (Mixup) loss."""
    from timm.loss import SoftTargetCrossEntropy

    from ..finetune.weights import build_classifier

    dtype, size = DTYPES[cfg.deepspeed.precision], cfg.model.img_size
    criterion = SoftTargetCrossEntropy()

    def loss(model: nn.Module, batch: int) -> torch.Tensor:
        images = torch.empty(batch, 3, size, size, dtype=dtype)
        targets = torch.empty(batch, cfg.model.num_classes)
        return criterion(model(images).float(), targets)

    return Recipe(lambda: cast_params(build_classifier(cfg.model), dtype), loss, size)


def is_pretraining(cfg: TrainConfig) -> bool:
    """SimMIM pretraining configs have a ``simmim`` section; fine-tuning configs do not (swinv2 cannot import
    simmim's config class to ask ``isinstance``)."""
    return hasattr(cfg, "simmim")
