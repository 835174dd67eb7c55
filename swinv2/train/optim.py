"""AdamW parameter groups (no-decay set, layer-wise LR decay) and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from ..attention import WindowAttentionV1, WindowAttentionV2
from ..model import SwinTransformer


def no_weight_decay_params(model: nn.Module) -> set[int]:
    """``id()`` of every parameter exempt from weight decay (SPEC section 2), found by identity, not by name.

    Biases and all 1-D parameters (norms, q/v biases); V2 ``logit_scale`` and the whole CPB MLP; V1 bias tables;
    the absolute position embedding; any ``mask_token`` (SimMIM). Matching module attributes instead of name
    prefixes keeps this right whatever the model is wrapped in.
    """
    exempt = {id(p) for p in model.parameters() if p.ndim <= 1}
    for module in model.modules():
        if isinstance(module, WindowAttentionV2):
            exempt.add(id(module.logit_scale))
            exempt.update(id(p) for p in module.cpb_mlp.parameters())
        elif isinstance(module, WindowAttentionV1):
            exempt.add(id(module.relative_position_bias_table))
        for name in ("absolute_pos_embed", "mask_token"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                exempt.add(id(param))
    return exempt


def _find_swin(model: nn.Module) -> SwinTransformer:
    found = [m for m in model.modules() if isinstance(m, SwinTransformer)]
    if len(found) != 1:
        raise ValueError(f"layer-wise LR decay needs exactly one Swin backbone in the model, found {len(found)}")
    return found[0]


def layer_ids(model: nn.Module) -> dict[int, int]:
    """``id(param) -> layer`` for layer-wise LR decay (SPEC section 3; BEiT/SimMIM fine-tuning).

    ``num_layers = sum(depths) + 2``: the patch embedding, absolute position embedding and mask token are
    layer 0; block j of stage s is ``sum(depths[:s]) + j + 1``; stage s's patch merging shares the layer of its
    last block, ``sum(depths[:s + 1])``; everything else (final norm, head) is the last layer.
    """
    swin = _find_swin(model)
    depths = [len(stage.blocks) for stage in swin.layers]
    last = sum(depths) + 1
    ids = {id(p): last for p in model.parameters()}
    first: list[nn.Parameter] = list(swin.patch_embed.parameters())
    first += [p for m in model.modules() for n in ("absolute_pos_embed", "mask_token")
              if isinstance(p := getattr(m, n, None), nn.Parameter)]
    ids.update({id(p): 0 for p in first})
    for s, stage in enumerate(swin.layers):
        start = sum(depths[:s])
        for j, block in enumerate(stage.blocks):
            ids.update({id(p): start + j + 1 for p in block.parameters()})
        if stage.downsample is not None:
            ids.update({id(p): start + depths[s] for p in stage.downsample.parameters()})
    return ids


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: decayed / not decayed, times one group per layer when ``layer_decay < 1``.

    Each group carries ``lr_scale`` (``layer_decay ** (num_layers - 1 - layer)``); the schedule multiplies the
    base LR by it exactly once.
    """
    exempt = no_weight_decay_params(model)
    layers = layer_ids(model) if layer_decay < 1.0 else None
    num_layers = max(layers.values()) + 1 if layers else 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layers[id(p)] if layers else 0
        decay = id(p) not in exempt
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers - 1 - layer) if layers else 1.0,
            },
        )
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, *, total_steps: int, warmup_steps: int, base_lr: float, warmup_lr: float, min_lr: float,
          kind: str, milestones: list[int] = (), gamma: float = 0.1) -> float:
    """Learning rate before optimizer step ``step`` (0-based): linear warmup from ``warmup_lr`` to ``base_lr``
    over ``warmup_steps``, then ``multistep`` (x ``gamma`` at each milestone step) or ``cosine`` down to ``min_lr``
    at ``total_steps``."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    if kind == "multistep":
        return base_lr * gamma ** sum(step >= m for m in milestones)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


class StepSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets each group's LR to ``lr_at(step) * lr_scale`` every optimizer step; resumable via ``state_dict``."""

    def __init__(self, optimizer: torch.optim.Optimizer, **schedule):
        self.schedule = schedule
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        lr = lr_at(self.last_epoch, **self.schedule)
        return [lr * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        # Only the position is restored: the schedule itself comes from the (possibly edited) config.
        self.last_epoch = state_dict["last_epoch"]
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def iter_named_groups(groups: list[dict]) -> Iterator[tuple[str, dict]]:
    """``(parameter name, its group)`` pairs, for inspection and tests."""
    for group in groups:
        for name in group["names"]:
            yield name, group
