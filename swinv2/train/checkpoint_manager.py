"""DeepSpeed checkpoints that are never half-used: a checkpoint counts only once its ``complete.json`` exists.

Layout: ``<dir>/step00000123/`` as written by ``engine.save_checkpoint`` (all ranks), then ``complete.json``
(written by rank 0 after a barrier, via a temporary name and a rename) holding the client state summary and the
size of every file of the checkpoint, and ``<dir>/latest`` naming it. A kill at any moment leaves the previous
complete checkpoint as the one resumed from; unfinished directories are removed by the next save. A checkpoint
damaged later (a file deleted or cut short, a broken ``complete.json``) is skipped for the newest intact one.
Resuming at a different world size goes through DeepSpeed's universal checkpoint (converted on the fly, once, into
``<tag>_universal``).

Every DeepSpeed read (loading, the universal conversion) is weights-only (:mod:`.safe_load`). A save first checks
on every rank that the disk has room for it, and a write that fails anyway (a full disk) ends every rank with
:class:`CheckpointWriteError` instead of leaving the others waiting in a collective.
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

from ..files import AtomicPath, write_text_atomic
from .config import ConfigError
from .safe_load import check_weights_only, weights_only_loads

MARKER = "complete.json"
TAG = re.compile(r"^step(\d{8,})$")


# Bytes per parameter of a checkpoint with AdamW: the fp32 master weights and two moments (12, ZeRO paper,
# arXiv 1910.02054 sec. 3) plus the module's own weights (at most 4); the first save's estimate.
BYTES_PER_PARAMETER = 16


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (no room on the disk, a failed write); the previous one is intact."""


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def _free_bytes(path: Path) -> int:
    while not path.exists():  # the folder is created by the first save
        path = path.parent
    return shutil.disk_usage(path).free


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB"


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

    def marked_tags(self) -> list[str]:
        """Checkpoints that have a ``complete.json``, intact or not, oldest first."""
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if TAG.match(p.name) and (p / MARKER).is_file()]
        return sorted(tags, key=lambda t: int(TAG.match(t).group(1)))

    def complete_tags(self) -> list[str]:
        """Complete, intact checkpoints (:meth:`damage`), oldest first."""
        return [tag for tag in self.marked_tags() if not self.damage(tag)]

    def damage(self, tag: str) -> str:
        """Why checkpoint ``tag`` cannot be resumed from ('' if it can): its ``complete.json`` must parse and every
        file it lists must be there with the size it had when saved (a cheap check, no file is read)."""
        folder = self.dir / tag
        try:
            meta = json.loads((folder / MARKER).read_text())
            int(meta["step"]), int(meta["world_size"])
            files = dict(meta.get("files", {}))  # absent in checkpoints written before sizes were recorded
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"its {MARKER} is unreadable or incomplete ({type(error).__name__}: {str(error)[:80]})"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, not the {size} it was saved with"
        return ""

    def resume_point(self, world_size: int) -> ResumePoint | None:
        """The newest intact checkpoint, or None; converted to a universal checkpoint if the world size changed.

        Damaged newer ones (a deleted or cut file, a broken ``complete.json``) are skipped, each named with its
        damage; if every one is damaged, a :class:`ConfigError` says so."""
        tags, damaged = [], []
        for tag in reversed(self.marked_tags()):
            why = self.damage(tag)
            if not why:
                tags = [tag]
                break
            damaged.append(f"checkpoint {self.dir / tag} is damaged ({why})")
        if damaged and not tags:
            raise ConfigError(f"{'; '.join(damaged)}, and no intact one is left to resume from: restore it, or "
                              "start over with resume=false (or another run.output_dir)")
        if damaged and self.rank == 0:
            print(f"{'; '.join(damaged)}: skipped, resuming from {self.dir / tags[0]} instead", flush=True)
        if not tags:
            return None
        tag = tags[-1]
        meta = self.meta(tag)
        point = ResumePoint(tag, meta["step"], meta["world_size"])
        if point.world_size != world_size:
            self.ensure_universal(tag)
            point.universal = True
        return point

    def meta(self, tag: str) -> dict:
        """The ``complete.json`` of checkpoint ``tag``: step, world size, client state and the run's config."""
        return json.loads((self.dir / tag / MARKER).read_text())

    def ensure_universal(self, tag: str) -> None:
        target = self.dir / f"{tag}_universal"
        if self.rank == 0 and not (target / MARKER).is_file():
            publish = AtomicPath(target)  # staged as .<tag>_universal.tmp
            publish.discard()  # what an interrupted conversion left
            with publish as staging:
                self._convert_to_universal(tag, staging)
                shutil.rmtree(target, ignore_errors=True)
        _barrier()

    def _convert_to_universal(self, tag: str, staging: Path) -> None:
        """DeepSpeed's universal conversion of checkpoint ``tag`` into the folder ``staging``, marker included."""
        check_weights_only(self.dir / tag)  # a refusal names the checkpoint, here, not as the converter's traceback
        # DeepSpeed's converter, run with weights-only reads (its forked workers inherit the allow-list).
        runner = ("from swinv2.train.safe_load import run_module_weights_only as run; "
                  "run('deepspeed.checkpoint.ds_to_universal')")
        command = [sys.executable, "-c", runner, "--input_folder",
                   str(self.dir / tag), "--output_folder", str(staging), "--num_extract_workers", "1",
                   "--num_merge_workers", "1", "--inject_missing_state"]
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(
                f"converting checkpoint {tag} to DeepSpeed's universal format failed:\n{result.stderr[-2000:]}\n"
                f"resume with the original world size instead"
            )
        shutil.copy(self.dir / tag / MARKER, staging / MARKER)

    def load(self, engine: Any, point: ResumePoint) -> dict:
        """Load model, optimizer, scheduler and client state of ``point`` into ``engine``; returns the client state."""
        tag = f"{point.tag}_universal" if point.universal else point.tag
        with weights_only_loads(self.dir / tag):
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
        """Write the checkpoint for ``step`` on every rank, mark it complete, then prune (collective).

        Raises :class:`CheckpointWriteError` on every rank when the disk has no room for it (checked first) or a
        write fails; the partial folder is removed and the previous complete checkpoint stays as it was.
        """
        tag = f"step{step:08d}"
        if self.rank == 0:  # a folder of an earlier run (resume=false) must not count as complete while rewritten
            (self.dir / tag / MARKER).unlink(missing_ok=True)
        need = self._bytes_needed(engine)
        if _all_max(need - _free_bytes(self.dir)) > 0:  # also the barrier after the unlink
            raise CheckpointWriteError(self._no_room(tag, need, "not started"))
        # DeepSpeed's universal conversion needs this entry; plain data-parallel models have nothing else to declare.
        universal = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        try:
            # A rank whose write fails raises here and exits; the others then fail in DeepSpeed's closing barrier.
            engine.save_checkpoint(str(self.dir), tag=tag, client_state={**client_state, **universal},
                                   save_latest=False)
            _barrier()
            if self.rank == 0:
                self.write_extras(self.dir / tag)
                world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
                folder = self.dir / tag  # every rank's files and the extras: their sizes tell an intact checkpoint
                files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
                meta = {"step": step, "world_size": world, **client_state, "files": files}
                write_text_atomic(self.dir / tag / MARKER, json.dumps(meta, indent=1, default=str))
                write_text_atomic(self.dir / "latest", tag)
                self._prune(keep=tag)
            _barrier()
        except Exception as error:  # noqa: BLE001 - a full disk shows as OSError, torch's RuntimeError or a dead peer
            if self.rank == 0:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointWriteError(self._no_room(tag, need, f"{type(error).__name__}: {first[:160]}")) from None
        return self.dir / tag

    def write_extras(self, folder: Path) -> None:
        """Rank 0 adds its own files to a checkpoint folder before it is marked complete (e.g. the EMA weights)."""

    def _bytes_needed(self, engine: Any) -> int:
        """The size of the newest complete checkpoint, or an estimate from the parameter count before the first."""
        tags = self.complete_tags()
        if tags:
            return _folder_bytes(self.dir / tags[-1])
        count = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        return BYTES_PER_PARAMETER * count

    def _no_room(self, tag: str, need: int, what: str) -> str:
        tags = self.complete_tags()
        intact = f"the last complete checkpoint, {tags[-1]}, is intact" if tags else "no earlier checkpoint exists"
        return (f"checkpoint {tag} could not be written to {self.dir} ({what}): {_mb(_free_bytes(self.dir))} are "
                f"free there and a checkpoint needs about {_mb(need)}; free some space or set run.output_dir to a "
                f"larger disk, then run the same command again to resume ({intact})")

    def _prune(self, keep: str) -> None:
        complete = self.complete_tags()
        stale = set(complete[: max(0, len(complete) - self.keep_last)])
        for path in self.dir.iterdir():
            name = path.name.removesuffix("_universal")
            unfinished = TAG.match(path.name) and not (path / MARKER).is_file()
            if path.is_dir() and path.name != keep and (name in stale or unfinished):
                shutil.rmtree(path, ignore_errors=True)
