"""What a fine-tuning run keeps besides its DeepSpeed checkpoints: the EMA weights and the best weights.

- :class:`EmaCheckpointManager` stores the EMA (``ema.safetensors``) inside each DeepSpeed checkpoint folder
  before the checkpoint is marked complete, so a resumed run continues the same average.
- :class:`BestKeeper` keeps ``best.safetensors`` (the weights with the highest top-1 so far, model or EMA; the
  metrics ride along as safetensors metadata, so weights and numbers are replaced together by one rename),
  ``best.json`` (the same numbers, readable) and ``metrics.json`` (every evaluation of the run).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import save_safetensors, write_text_atomic
from ..train.checkpoint_manager import CheckpointManager, ResumePoint

EMA_FILE = "ema.safetensors"


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copy of ``module``'s weights; gathers ZeRO-3 partitions first (collective: call on every rank)."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


class EmaCheckpointManager(CheckpointManager):
    """A :class:`CheckpointManager` whose checkpoints also hold the EMA weights (rank 0 writes them)."""

    def __init__(self, directory: str | os.PathLike, keep_last: int, rank: int, ema: Any):
        super().__init__(directory, keep_last, rank)
        self.ema = ema

    def write_extras(self, folder: Path) -> None:
        # Before the checkpoint is marked complete, so a complete one always has its EMA.
        save_safetensors(full_state_dict(self.ema.module), folder / EMA_FILE)

    def load(self, engine: Any, point: ResumePoint) -> dict:
        from safetensors.torch import load_file

        client = super().load(engine, point)
        path = self.dir / point.tag / EMA_FILE
        if path.is_file():
            self.ema.module.load_state_dict(load_file(str(path), device=str(next(self.ema.module.parameters()).device)))
        else:  # a checkpoint written without EMA: start the average from the resumed weights
            self.ema.module.load_state_dict(engine.module.state_dict())
        return client


class BestKeeper:
    """Tracks evaluations; writes ``best.safetensors`` + ``best.json`` when top-1 improves (rank 0 writes)."""

    def __init__(self, folder: str | os.PathLike, rank: int, resumed: bool = False):
        """``resumed``: the run continues from a checkpoint, so the best so far and the history carry on."""
        self.dir, self.rank = Path(folder), rank
        best, history = self.dir / "best.json", self.dir / "metrics.json"
        self.best: dict | None = json.loads(best.read_text()) if resumed and best.is_file() else None
        self.history: list[dict] = json.loads(history.read_text()) if resumed and history.is_file() else []

    @property
    def best_top1(self) -> float:
        return self.best["top1"] if self.best else -math.inf

    def record(self, entry: dict) -> None:
        """Append one evaluation (a flat dict of numbers) to ``metrics.json``."""
        self.history.append(entry)
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.dir / "metrics.json", json.dumps(self.history, indent=1) + "\n")

    def offer(self, top1: float, weights: Callable[[], dict[str, torch.Tensor]], info: dict) -> bool:
        """Keep these weights if ``top1`` beats the best so far. ``weights()`` runs on every rank (it may gather)."""
        if top1 <= self.best_top1:
            return False
        state = weights()
        self.best = {"top1": top1, **info}
        if self.rank == 0:
            metadata = {k: str(v) for k, v in self.best.items()}
            save_safetensors(state, self.dir / "best.safetensors", metadata)
            write_text_atomic(self.dir / "best.json", json.dumps(self.best, indent=1) + "\n")
        return True
