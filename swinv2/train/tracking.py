"""Rank-0 reporting: wandb (online, offline or disabled), a tqdm bar on a terminal or log lines otherwise, PNGs."""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_atomic


class Tracker:
    """Metrics to wandb and the console, images to wandb and PNG files; every method is a no-op off rank 0.

    ``run_id`` resumes the same wandb run after a restart (it is stored in checkpoints). wandb is never fatal once
    the run is going: its service is a separate process that a launcher's SIGTERM may kill before the training
    process has checkpointed, so a failing wandb call is reported once and the metrics go on to the console.
    """

    def __init__(self, wandb_cfg: Any, output_dir: str | os.PathLike, config: dict, rank: int, total_steps: int,
                 start_step: int = 0, run_id: str | None = None, log_every: int = 20):
        self.rank, self.total_steps, self.log_every = rank, total_steps, log_every
        self.output_dir = Path(output_dir)
        self.run = None
        self.run_id = run_id
        self.bar = None
        self._start = time.monotonic()
        self._start_step = start_step
        if rank != 0:
            return
        if wandb_cfg.mode != "disabled":
            import wandb

            self.run_id = run_id or secrets.token_hex(4)  # stored in checkpoints so a resume continues this run
            self.run = wandb.init(
                project=wandb_cfg.project, name=wandb_cfg.name, tags=list(wandb_cfg.tags), mode=wandb_cfg.mode,
                config=config, dir=str(self.output_dir), id=self.run_id, resume="allow",
            )
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def eta_seconds(self, step: int) -> float:
        done = step - self._start_step
        elapsed = time.monotonic() - self._start
        return elapsed / done * (self.total_steps - step) if done > 0 else float("nan")

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Send ``metrics`` for optimizer step ``step``; the console shows them every ``log_every`` steps."""
        if self.rank != 0:
            return
        if self.run is not None:
            self._wandb(self.run.log, metrics, step=step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k.split("/")[-1]: _short(v) for k, v in metrics.items() if k.startswith("train/")},
                                 refresh=True)
        elif step % self.log_every == 0 or step == self.total_steps:
            shown = " ".join(f"{k.split('/')[-1]} {_short(v)}" for k, v in metrics.items() if k != "train/eta_min")
            eta = self.eta_seconds(step)
            print(f"step {step}/{self.total_steps} {shown} eta {_duration(eta)}", flush=True)

    def send(self, metrics: dict[str, float], step: int) -> None:
        """Send ``metrics`` to wandb only (e.g. evaluation results the caller prints itself)."""
        if self.run is not None:
            self._wandb(self.run.log, metrics, step=step)

    def image(self, key: str, array: np.ndarray, step: int) -> Path | None:
        """Save an RGB uint8 image as ``output_dir/images/{key}_{step}.png`` (atomically) and send it to wandb."""
        if self.rank != 0:
            return None
        from PIL import Image

        path = write_atomic(self.output_dir / "images" / f"{key}_{step:08d}.png",
                            lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
        if self.run is not None:
            import wandb

            self._wandb(lambda: self.run.log({key: wandb.Image(array)}, step=step))
        return path

    def _wandb(self, call: Any, *args: Any, **kwargs: Any) -> None:
        """Run a wandb call; if wandb fails, say so once and go on without it (console and files only)."""
        try:
            call(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - whatever broke inside wandb, training goes on
            self.run = None
            import wandb

            try:  # release the dead service now, or wandb's exit hook tries again and prints a traceback at exit
                wandb.teardown()
            except Exception:  # noqa: BLE001, S110 - it is known to be broken
                pass
            self.print(f"wandb stopped working ({type(error).__name__}: {error}); metrics go to the console only "
                       "from here on")

    def print(self, message: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            self._wandb(self.run.finish)


def _short(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
