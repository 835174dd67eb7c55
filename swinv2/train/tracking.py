"""Rank-0 reporting: wandb (online, offline or disabled), ``metrics.jsonl``, a tqdm bar on a terminal or short
log lines otherwise (:mod:`.console`), PNGs."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_atomic
from .config import WandbConfig
from .console import report_lines, short_fields

METRICS_FILE = "metrics.jsonl"


class Tracker:
    """Metrics to wandb, ``metrics.jsonl`` and the console, images to wandb and PNG files; every method is a no-op
    off rank 0.

    Each report goes whole (every metric) to wandb and as one JSON object with its ``step`` to
    ``output_dir/metrics.jsonl`` (appended, so a resumed run goes on with it; flushed per line); the console shows
    a short line of it (:func:`.console.report_lines`).

    ``run_id`` resumes the same wandb run after a restart (it is stored in checkpoints). wandb is never fatal once
    the run is going: its service is a separate process that a launcher's SIGTERM may kill before the training
    process has checkpointed, so a failing wandb call is reported once and the metrics go on to the console.
    """

    def __init__(self, wandb_cfg: WandbConfig, output_dir: str | os.PathLike, config: dict, rank: int, total_steps: int,
                 start_step: int = 0, run_id: str | None = None, log_every: int = 20):
        self.rank, self.total_steps, self.log_every = rank, total_steps, log_every
        self.output_dir = Path(output_dir)
        self.run = None
        self.run_id = run_id
        self.bar = None
        self.metrics_file = None
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
                settings=wandb.Settings(quiet=True),  # no banner nor end-of-run summary; warnings still show
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = (self.output_dir / METRICS_FILE).open("a", encoding="utf-8")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def eta_seconds(self, step: int) -> float:
        """Seconds left to ``total_steps`` at this invocation's pace so far (NaN before its first step)."""
        done = step - self._start_step
        elapsed = time.monotonic() - self._start
        return elapsed / done * (self.total_steps - step) if done > 0 else float("nan")

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Report ``metrics`` of optimizer step ``step``: all of them to wandb and ``metrics.jsonl``, a short line
        to the console every ``log_every`` steps (or the bar's postfix on a terminal)."""
        if self.rank != 0:
            return
        if self.run is not None:
            self._wandb(self.run.log, metrics, step=step)
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.metrics_file.flush()
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(short_fields(metrics), refresh=True)
        elif step % self.log_every == 0 or step == self.total_steps:
            print("\n".join(report_lines(step, self.total_steps, metrics, self.eta_seconds(step))), flush=True)

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
            self.print(f"wandb stopped working ({type(error).__name__}: {error}); metrics go to the console and "
                       f"{METRICS_FILE} only from here on")

    def print(self, message: str) -> None:
        """A message on the console (above the bar, if there is one), rank 0 only."""
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def finish(self) -> None:
        """Close the bar, ``metrics.jsonl`` and the wandb run."""
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            self._wandb(self.run.finish)

