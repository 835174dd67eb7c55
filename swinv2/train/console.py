"""The report as a person reads it: a short line of the metrics that matter (the full set goes to wandb and
``metrics.jsonl``), and the same fields as a tqdm postfix."""

from __future__ import annotations

import math
from collections.abc import Mapping

WIDTH = 120  # no report line is longer
# Shown only when not zero: each means something went wrong (or was worked around) since the run started.
COUNTERS = ("train/skipped_samples", "train/skipped_steps", "train/nonfinite_steps", "train/nonfinite_skipped",
            "train/rollbacks")


def _number(value: float) -> str:
    return f"{value:.4g}"


def _speed(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _percent(value: float) -> str:
    return f"{value:.3g}%"


def _memory(mib: float) -> str:
    return f"{mib:.0f}MiB" if mib < 1024 else f"{mib / 1024:.1f}GiB"


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``; ``?`` when unknown (NaN)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# (metric, label, format): the short set, in the order shown.
SHORT = (("train/loss", "loss", _number), ("train/lr", "lr", _number), ("train/grad_norm", "grad", _number),
         ("train/images_per_s", "img/s", _speed), ("train/mfu_pct", "mfu", _percent),
         ("train/peak_memory_mb", "mem", _memory))


def short_fields(metrics: Mapping[str, float], eta_seconds: float | None = None) -> dict[str, str]:
    """``{label: text}`` of the short set that ``metrics`` has (and the ETA, if given), then every counter that is
    not zero."""
    shown = {label: fmt(metrics[key]) for key, label, fmt in SHORT if key in metrics}
    if eta_seconds is not None:
        shown["eta"] = duration(eta_seconds)
    shown.update({key.split("/")[-1]: str(int(metrics[key])) for key in COUNTERS if metrics.get(key)})
    return shown


def report_lines(step: int, total: int, metrics: Mapping[str, float], eta_seconds: float,
                 width: int = WIDTH) -> list[str]:
    """``step S/T loss L lr R grad G img/s X mfu M% mem N eta E`` and the non-zero counters, in lines of at most
    ``width`` characters: fields that do not fit go on to an indented next line."""
    lines, line = [], f"step {step}/{total}"
    for label, text in short_fields(metrics, eta_seconds).items():
        token = f" {label} {text}"
        if len(line) + len(token) > width:
            lines.append(line[:width])
            line = "  "
        line += token
    lines.append(line[:width])  # only a field wider than a line (never, in practice) is cut
    return lines
