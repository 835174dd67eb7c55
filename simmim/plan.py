"""The memory planner's view of a SimMIM pretraining config (``launch/plan.py``, :mod:`swinv2.plan`)."""

from __future__ import annotations

import torch
from torch import nn

from swinv2.plan.fake import Recipe, cast_params
from swinv2.train.config import DTYPES

from .config import PretrainConfig
from .pretrain import build_simmim


def simmim_recipe(cfg: PretrainConfig) -> Recipe:
    """The SimMIM model as pretraining builds it (cast as DeepSpeed casts it) and one micro batch's loss:
    normalised images in the training precision and MaskGenerator's int64 token masks."""
    dtype, size = DTYPES[cfg.deepspeed.precision], cfg.model.img_size

    def loss(model: nn.Module, batch: int) -> torch.Tensor:
        images = torch.empty(batch, 3, size, size, dtype=dtype)
        mask = torch.zeros(batch, size // 4, size // 4, dtype=torch.int64)
        return model(images, mask)

    return Recipe(lambda: cast_params(build_simmim(cfg), dtype), loss, size)
