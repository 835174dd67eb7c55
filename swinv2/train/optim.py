"""AdamW parameter groups (no-decay set and layer-wise LR decay, as the model states them) and the per-step
learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def _ask(model: nn.Module, fact: str):
    method = getattr(model, fact, None)
    if not callable(method):
        raise ValueError(
            f"{type(model).__name__} has no {fact}() method, which the optimizer's parameter groups need: build it "
            "with swinv2.create_model or simmim.SimMIM, or give it one"
        )
    return method()


def no_weight_decay_params(model: nn.Module) -> set[int]:
    """``id()`` of every parameter exempt from weight decay, as the model names them in ``no_weight_decay()``."""
    names = _ask(model, "no_weight_decay")
    return {id(p) for name, p in model.named_parameters() if name in names}


def layer_ids(model: nn.Module) -> dict[int, int]:
    """``id(param) -> layer`` for layer-wise LR decay, as the model numbers them in ``layer_ids()``."""
    ids = _ask(model, "layer_ids")
    return {id(p): ids[name] for name, p in model.named_parameters()}


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

