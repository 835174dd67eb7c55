"""Two small pieces Swin shares with timm, kept here so that building a model does not import timm: ``timm.layers``
pulls in torchvision, about 2.5 s of CPU (a quarter) of every training process's start-up. Both draw exactly the
random numbers timm's do (tests/test_start_up.py), so weights and runs are unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
                  ) -> torch.Tensor:
    """Fill ``tensor`` in place from N(mean, std^2) truncated to ``[a, b]`` (absolute bounds), by the inverse CDF:
    a uniform draw between the CDF values of the bounds, mapped through erfinv. The weight initialisation of Swin
    (arXiv 2103.14030 sec. 4.1, std 0.02) as timm and the authors' code draw it."""
    def cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    low, high = cdf((a - mean) / std), cdf((b - mean) / std)
    tensor.uniform_(2 * low - 1, 2 * high - 1)  # erf's range, so that erfinv gives a standard normal deviate
    tensor.erfinv_().mul_(std * math.sqrt(2.0)).add_(mean)
    return tensor.clamp_(min=a, max=b)  # rounding may step just outside


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., arXiv 1603.09382): in training, zero a residual branch for a whole sample
    with probability ``drop_prob`` and scale the kept ones by ``1 / (1 - drop_prob)``; the identity in eval."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"
