"""The report's outlets without a run: the short console line (:mod:`swinv2.train.console`), ``metrics.jsonl``
(:class:`swinv2.train.tracking.Tracker`), the step profiler's schedule (:mod:`swinv2.train.profiling`) and
DeepSpeed's accelerator notice once per run (:mod:`swinv2.train.quiet`). The
real runs' reports are checked in ``test_loop_mfu.py`` and ``test_nonfinite.py``."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from swinv2.train.config import WandbConfig
from swinv2.train.console import WIDTH, duration, report_lines, short_fields
from swinv2.train.profiling import profile_steps
from swinv2.train.quiet import NOTICE
from swinv2.train.tracking import Tracker, last_logged_updates

ROOT = Path(__file__).resolve().parents[1]
REPORT = {
    "train/loss": 0.74331, "train/lr": 0.0005, "train/grad_norm": 0.31481, "train/images_per_s": 10.0216,
    "train/tflops": 0.000335, "train/mfu_pct": 1.22906, "train/step_time_s": 0.7983, "train/time_data_s": 0.0277,
    "train/time_fwd_bwd_s": 0.6583, "train/time_optimizer_s": 0.1109, "train/time_checkpoint_s": 0.0,
    "train/peak_memory_mb": 952.2, "train/epoch": 0, "train/skipped_samples": 0, "train/skipped_steps": 0,
    "train/nonfinite_steps": 0, "train/nonfinite_skipped": 0, "train/rollbacks": 0, "train/eta_min": 1.98,
}


def test_the_line_shows_the_short_set_and_counters_only_when_not_zero():
    (line,) = report_lines(4, 30, REPORT, eta_seconds=119)
    assert line == "step 4/30 loss 0.7433 lr 0.0005 grad 0.3148 img/s 10.0 mfu 1.23% mem 952MiB eta 1m59s"
    bad = {**REPORT, "train/skipped_steps": 2, "train/nonfinite_steps": 2, "train/rollbacks": 1}
    first, second = report_lines(4, 30, bad, eta_seconds=119)  # too long for one line: the rest goes on the next
    assert first == line + " skipped_steps 2 nonfinite_steps 2" and second == "   rollbacks 1"
    # A report without MFU (no FLOP count) leaves it out; an unknown ETA is "?".
    assert list(short_fields({"train/loss": 1.0, "train/lr": 0.1}, math.nan)) == ["loss", "lr", "eta"]
    assert duration(math.nan) == "?" and duration(3725) == "1h02m"


def test_every_line_fits_the_width_even_with_every_counter_large():
    worst = {**REPORT, "train/loss": -1.234567e-12, "train/lr": 1.23456e-07, "train/grad_norm": 123456789.0,
             "train/images_per_s": 1.2e7, "train/mfu_pct": 99.99, "train/peak_memory_mb": 2.0e6,
             **{f"train/{k}": 123456789 for k in ("skipped_samples", "skipped_steps", "nonfinite_steps",
                                                  "nonfinite_skipped", "rollbacks")}}
    lines = report_lines(1234567, 1234567, worst, eta_seconds=3600 * 99999)
    assert len(lines) == 3 and all(len(line) <= WIDTH for line in lines), lines
    assert lines[0].startswith("step 1234567/1234567 loss ") and all(line.startswith("   ") for line in lines[1:])
    words = " ".join(lines).split()
    assert words[words.index("rollbacks") + 1] == "123456789"  # wrapped, nothing lost


def test_metrics_jsonl_gets_every_field_once_per_report_and_a_resumed_run_appends(tmp_path, capsys):
    wandb = WandbConfig(mode="disabled")
    tracker = Tracker(wandb, tmp_path, {}, rank=0, total_steps=30, log_every=2)
    tracker.log(REPORT, 2)
    tracker.log({**REPORT, "train/loss": float("nan")}, 3)  # a report off the console's beat: the file has it
    tracker.finish()
    resumed = Tracker(wandb, tmp_path, {}, rank=0, total_steps=30, start_step=3, log_every=2)
    resumed.log(REPORT, 4)
    resumed.finish()
    Tracker(wandb, tmp_path, {}, rank=1, total_steps=30).log(REPORT, 6)  # other ranks write nothing
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4]
    assert rows[0] == {"step": 2, **REPORT, "train/updates": 2} and math.isnan(rows[1]["train/loss"])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in printed] == ["2/30", "4/30"]


def test_the_eta_counts_from_the_first_report_which_takes_its_own_step_time(tmp_path, capsys):
    tracker = Tracker(WandbConfig(mode="disabled"), tmp_path, {}, rank=0, total_steps=30, log_every=2)
    # Start-up (and a step-0 evaluation) happened since the tracker was made; the first report has no pace yet.
    assert math.isnan(tracker.eta_seconds(2))
    tracker.log({**REPORT, "train/eta_min": math.nan, "train/step_time_s": 5.0}, 2)  # its window: 5 s per step
    assert capsys.readouterr().out.split()[-1] == "2m20s"  # 28 steps left at 5 s
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["train/eta_min"] == 28 * 5.0 / 60
    assert tracker.eta_seconds(4) >= 0  # from the pace since the first report on
    tracker.rolled_back(4, 2)  # the steps run again: the pace starts over
    assert math.isnan(tracker.eta_seconds(3))
    tracker.finish()


def wandb_records(run_file: Path, kind: str) -> list:
    """The ``kind`` records (``history``, ``summary``) of an offline wandb run file, as ``{key: value}`` dicts, in
    order (the LevelDB-log layout that ``pretrain_helpers.wandb_history`` decodes)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, out = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, chunk_kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if chunk_kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if chunk_kind in (1, 2) else pending + chunk
        if chunk_kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == kind:
                items = record.history.item if kind == "history" else record.summary.update
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return out


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def _online_run(tmp_path, monkeypatch, capsys) -> tuple[Path, str, float]:
    """An online Tracker that cannot reach wandb; returns its offline run file, what it printed and its start time."""
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_unused_port()}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc key
    started = time.monotonic()
    tracker = Tracker(WandbConfig(mode="online"), tmp_path / "run", {}, rank=0, total_steps=4)
    seconds = time.monotonic() - started
    tracker.log({"train/loss": 1.0}, 1)
    tracker.finish()
    return next((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")), capsys.readouterr().out, seconds


@pytest.mark.slow
def test_online_without_an_api_key_logs_offline_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_file, printed, seconds = _online_run(tmp_path, monkeypatch, capsys)
    assert [row["train/loss"] for row in wandb_records(run_file, "history")] == [1.0]
    assert printed.startswith("wandb could not start online (No API key configured."), printed
    assert f"so this run logs offline to {tmp_path / 'run' / 'wandb'}; upload it later with `wandb sync`" in printed
    print(f"fell back in {seconds:.1f} s")


@pytest.mark.slow
def test_online_without_a_network_logs_offline_after_the_init_timeout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key, but the server is a closed local port
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    run_file, printed, seconds = _online_run(tmp_path, monkeypatch, capsys)
    assert [row["train/loss"] for row in wandb_records(run_file, "history")] == [1.0]
    assert printed.startswith("wandb could not start online ("), printed
    print(f"fell back in {seconds:.1f} s")


@pytest.mark.slow
def test_rows_after_a_rollback_and_a_crash_resume_reach_wandb_at_growing_updates(tmp_path):
    # wandb keeps one row per step and drops a row logged at a step it has passed: rows go at updates done.
    offline = WandbConfig(mode="offline")
    tracker = Tracker(offline, tmp_path, {}, rank=0, total_steps=10, run_id="rolled")
    for step in (1, 2, 3):
        tracker.log({"train/loss": float(step), "train/lr": 5.005e-06}, step)
    tracker.rolled_back(3, 1)  # steps 2 and 3 run again
    for step in (2, 3, 4):
        tracker.log({"train/loss": 10.0 + step, "train/lr": 5.005e-06}, step)
    tracker.finish()
    assert last_logged_updates(tmp_path / "metrics.jsonl") == 6
    # A crash after step 4; the run resumes from a checkpoint at step 2 and runs steps 3.. again.
    resumed = Tracker(offline, tmp_path, {}, rank=0, total_steps=10, start_step=2, run_id="rolled")
    resumed.log({"train/loss": 23.0, "train/lr": 5.005e-06}, 3)
    resumed.finish()
    first, second = sorted((tmp_path / "wandb").glob("offline-run-*/run-rolled.wandb"))
    rows = wandb_records(first, "history")
    assert [(r["_step"], r["train/step"], r["train/loss"]) for r in rows] == [
        (1, 1, 1.0), (2, 2, 2.0), (3, 3, 3.0), (4, 2, 12.0), (5, 3, 13.0), (6, 4, 14.0)]
    assert [(r["_step"], r["train/step"]) for r in wandb_records(second, "history")] == [(7, 3)]
    # The summary keeps the LR as logged (wandb's own end-of-run printout would show round(x, 5) = 1e-05).
    summary = {k: v for update in wandb_records(first, "summary") for k, v in update.items()}
    assert summary["train/lr"] == 5.005e-06


def _steps(profiler, steps):
    for step in steps:
        with profiler.step_range(step):
            torch.ones(4).add_(1)
        profiler.step_done(step)


def _traced_steps(path):
    events = json.loads(path.read_text())["traceEvents"]
    return sorted(e["name"] for e in events if e.get("name", "").startswith("train_step_"))


def test_profiler_traces_its_steps_after_a_resume_and_never_a_rolled_back_step_twice(tmp_path):
    # Resumed at step 2: steps 3..5 are traced (the schedule counts steps, not calls).
    with profile_steps([3, 5], 2, tmp_path, 0) as profiler:
        _steps(profiler, range(3, 9))
    assert _traced_steps(tmp_path / "trace_steps3-5_rank0.json") == [f"train_step_{s}" for s in (3, 4, 5)]
    # A rollback from step 4 to step 2 while steps 3..6 are traced: the trace ends with what it has (3, 4) and
    # steps 3..6 run again untraced.
    with profile_steps([3, 6], 0, tmp_path, 0) as profiler:
        _steps(profiler, range(1, 5))
        profiler.rolled_back(2)
        _steps(profiler, range(3, 8))
    assert _traced_steps(tmp_path / "trace_steps3-6_rank0.json") == ["train_step_3", "train_step_4"]
    # A rollback before the window: it still traces steps 5..6, once.
    with profile_steps([5, 6], 0, tmp_path, 0) as profiler:
        _steps(profiler, range(1, 4))
        profiler.rolled_back(1)
        _steps(profiler, range(2, 8))
    assert _traced_steps(tmp_path / "trace_steps5-6_rank0.json") == ["train_step_5", "train_step_6"]


@pytest.mark.slow
@pytest.mark.parametrize("rank, shown", [("0", 1), ("1", 0)])
def test_deepspeeds_accelerator_notice_is_kept_once_and_other_warnings_pass(rank, shown):
    code = ("from swinv2.train.quiet import quiet_repeated_deepspeed_notices\n"
            "quiet_repeated_deepspeed_notices()\n"
            "import deepspeed\n"
            "from deepspeed.utils import logger\n"
            "logger.warning('a real warning')\n")
    env = {**os.environ, "RANK": rank, "CUDA_VISIBLE_DEVICES": ""}  # no GPU: DeepSpeed falls back to the CPU
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert text.count(NOTICE) == shown and "a real warning" in text, text
