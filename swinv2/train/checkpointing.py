"""DeepSpeed checkpoints that are never half-used: a checkpoint counts only once its ``complete.json`` exists.

Layout: ``<dir>/step00000123/`` as written by ``engine.save_checkpoint`` (all ranks), then ``complete.json``
(written by rank 0 after a barrier, via a temporary name and a rename) holding the client state summary, and
``<dir>/latest`` naming it. A kill at any moment leaves the previous complete checkpoint as the one resumed from;
unfinished directories are removed by the next save. Resuming at a different world size goes through DeepSpeed's
universal checkpoint (converted on the fly, once, into ``<tag>_universal``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from .files import write_text_atomic

MARKER = "complete.json"
TAG = re.compile(r"^step(\d{8,})$")


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@dataclass
class ResumePoint:
    """A complete checkpoint to continue from (``universal``: load it through DeepSpeed's universal format)."""

    tag: str
    step: int
    world_size: int
    universal: bool = False


class CheckpointManager:
    """Save every N steps, keep the last K complete checkpoints, find the newest complete one to resume from."""

    def __init__(self, directory: str | os.PathLike, keep_last: int, rank: int):
        self.dir = Path(directory)
        self.keep_last, self.rank = keep_last, rank

    def complete_tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if TAG.match(p.name) and (p / MARKER).is_file()]
        return sorted(tags, key=lambda t: int(TAG.match(t).group(1)))

    def resume_point(self, world_size: int) -> ResumePoint | None:
        """The newest complete checkpoint, or None; converted to a universal checkpoint if the world size changed."""
        tags = self.complete_tags()
        if not tags:
            return None
        tag = tags[-1]
        meta = json.loads((self.dir / tag / MARKER).read_text())
        point = ResumePoint(tag, meta["step"], meta["world_size"])
        if point.world_size != world_size:
            self.ensure_universal(tag)
            point.universal = True
        return point

    def ensure_universal(self, tag: str) -> None:
        target = self.dir / f"{tag}_universal"
        if self.rank == 0 and not (target / MARKER).is_file():
            staging = self.dir / f".{tag}_universal.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                       str(self.dir / tag), "--output_folder", str(staging), "--num_extract_workers", "1",
                       "--num_merge_workers", "1", "--inject_missing_state"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(
                    f"converting checkpoint {tag} to DeepSpeed's universal format failed:\n{result.stderr[-2000:]}\n"
                    f"resume with the original world size instead"
                )
            shutil.copy(self.dir / tag / MARKER, staging / MARKER)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        _barrier()

    def load(self, engine: Any, point: ResumePoint) -> dict:
        """Load model, optimizer, scheduler and client state of ``point`` into ``engine``; returns the client state."""
        tag = f"{point.tag}_universal" if point.universal else point.tag
        path, client = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}: start over with resume=false")
        scheduler = getattr(engine, "lr_scheduler", None)
        if scheduler is not None:
            # DeepSpeed loads the optimizer's param groups, with the LR saved in them, after the scheduler's state:
            # set the LR again from the schedule at the restored step, so an edited config counts from the first step.
            scheduler.load_state_dict(scheduler.state_dict())
        return client or {}

    def save(self, engine: Any, step: int, client_state: dict) -> Path:
        """Write the checkpoint for ``step`` on every rank, mark it complete, then prune (collective)."""
        tag = f"step{step:08d}"
        # DeepSpeed's universal conversion needs this entry; plain data-parallel models have nothing else to declare.
        universal = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={**client_state, **universal}, save_latest=False)
        _barrier()
        if self.rank == 0:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            meta = {"step": step, "world_size": world, **{k: v for k, v in client_state.items() if k != "config"}}
            write_text_atomic(self.dir / tag / MARKER, json.dumps(meta, indent=1, default=str))
            write_text_atomic(self.dir / "latest", tag)
            self._prune(keep=tag)
        _barrier()
        return self.dir / tag

    def _prune(self, keep: str) -> None:
        complete = self.complete_tags()
        stale = set(complete[: max(0, len(complete) - self.keep_last)])
        for path in self.dir.iterdir():
            name = path.name.removesuffix("_universal")
            unfinished = TAG.match(path.name) and not (path / MARKER).is_file()
            if path.is_dir() and path.name != keep and (name in stale or unfinished):
                shutil.rmtree(path, ignore_errors=True)
