"""Rank-0 reporting: wandb (online, offline or disabled), ``metrics.jsonl``, a tqdm bar on a terminal or short
log lines otherwise (:mod:`.console`), PNGs."""

from __future__ import annotations

import json
import math
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
INIT_TIMEOUT = 30  # seconds wandb.init may wait for its server before the run logs offline (wandb's default: 90)


def last_logged_updates(path: Path) -> int:
    """``train/updates`` (else ``step``) of the last row of an earlier invocation's ``metrics.jsonl`` (0: none)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))  # the tail holds the last row
            lines = f.read().decode("utf-8", "replace").splitlines()
        row = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):  # none yet, or a row cut by a crash: count from the resumed step
        return 0
    return int(row.get("train/updates", row.get("step", 0))) if isinstance(row, dict) else 0


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
        self._pace: tuple[float, int] | None = None  # (time, step) of the first report: where the ETA counts from
        # wandb's own step axis only moves forward (it drops a row logged at a step it has passed), so rows go at
        # optimizer updates done: the step, plus the steps undone by rollbacks and by a crash's resume before it.
        self._updates_base, self._base_step = start_step, start_step
        if rank != 0:
            return
        if wandb_cfg.mode != "disabled":
            self.run_id = run_id or secrets.token_hex(4)  # stored in checkpoints so a resume continues this run
            self.run = self._start_wandb(wandb_cfg, config)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / METRICS_FILE
        if run_id or start_step:  # resuming: go on from the last row of its earlier invocations
            self._updates_base = max(start_step, last_logged_updates(path))
        self.metrics_file = path.open("a", encoding="utf-8")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _start_wandb(self, cfg: WandbConfig, config: dict) -> Any:
        """``wandb.init``; an online run that cannot start (no API key, no network within ``WANDB_INIT_TIMEOUT``
        seconds, default 30) logs offline instead and says so: a preempted job must not die of its dashboard."""
        import wandb

        def init(mode: str) -> Any:
            timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT))
            return wandb.init(project=cfg.project, name=cfg.name, tags=list(cfg.tags), mode=mode, config=config,
                              dir=str(self.output_dir), id=self.run_id, resume="allow",
                              # no banner nor end-of-run summary (it rounds to 5 decimals); warnings still show
                              settings=wandb.Settings(quiet=True, init_timeout=timeout))

        if cfg.mode != "online":
            return init(cfg.mode)
        try:
            return init("online")
        except wandb.errors.Error as error:  # UsageError: no API key; CommError: no server within the timeout
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self.print(f"wandb could not start online ({first}), so this run logs offline to "
                       f"{self.output_dir / 'wandb'}; upload it later with `wandb sync`")
            wandb.teardown()  # the failed run still holds its id in wandb's service
            return init("offline")

    def updates(self, step: int) -> int:
        """Optimizer updates done when the run is at ``step``: grows with every step, also past a rollback."""
        return self._updates_base + step - self._base_step

    def rolled_back(self, step: int, back_to: int) -> None:
        """The run went back from ``step`` to ``back_to``: the steps after it are updates done anew."""
        self._updates_base, self._base_step = self.updates(step), back_to
        self._pace = None  # the reloaded steps run again: count the pace afresh

    def eta_seconds(self, step: int) -> float:
        """Seconds left to ``total_steps`` at the pace since this invocation's first report (NaN at that report):
        start-up, the step-0 evaluation and the first step's warm-up do not count."""
        now = time.monotonic()
        if self._pace is None or step <= self._pace[1]:
            self._pace = (now, step)
            return float("nan")
        since, first = self._pace
        return (now - since) / (step - first) * (self.total_steps - step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Report ``metrics`` of optimizer step ``step``: all of them to wandb and ``metrics.jsonl``, a short line
        to the console every ``log_every`` steps (or the bar's postfix on a terminal).

        The first report of an invocation has no pace yet (``train/eta_min`` NaN): it takes its own window's
        step time (``train/step_time_s``) instead."""
        if self.rank != 0:
            return
        eta = metrics.get("train/eta_min", float("nan")) * 60
        if math.isnan(eta) and "train/step_time_s" in metrics:
            eta = metrics["train/step_time_s"] * (self.total_steps - step)
            metrics = {**metrics, "train/eta_min": eta / 60}
        metrics = {**metrics, "train/updates": self.updates(step)}
        if self.run is not None:
            self._wandb(self.run.log, {**metrics, "train/step": step}, step=self.updates(step))
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.metrics_file.flush()
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(short_fields(metrics), refresh=True)
        elif step % self.log_every == 0 or step == self.total_steps:
            print("\n".join(report_lines(step, self.total_steps, metrics, eta)), flush=True)

    def send(self, metrics: dict[str, float], step: int) -> None:
        """Send ``metrics`` to wandb only (e.g. evaluation results the caller prints itself)."""
        if self.run is not None:
            self._wandb(self.run.log, {**metrics, "train/step": step}, step=self.updates(step))

    def image(self, key: str, array: np.ndarray, step: int) -> Path | None:
        """Save an RGB uint8 image as ``output_dir/images/{key}_{step}.png`` (atomically) and send it to wandb."""
        if self.rank != 0:
            return None
        from PIL import Image

        path = write_atomic(self.output_dir / "images" / f"{key}_{step:08d}.png",
                            lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
        if self.run is not None:
            import wandb

            self._wandb(lambda: self.run.log({key: wandb.Image(array), "train/step": step}, step=self.updates(step)))
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

