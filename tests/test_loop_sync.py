"""The step loop reads nothing from a tensor to the host between sync steps, and still stops cleanly on SIGTERM.

A real ``launch/pretrain.py`` run (DeepSpeed on the CPU) under ``tests/helpers/loop_probe.py``, which wraps every method
that reads a tensor to the host (``item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``, ``__float__``, ...) and
records which code called it in which step. On a GPU each such read waits for the device queue to drain; the
loop keeps its losses and flags on the device and reads them at sync steps only: report steps (``run.log_every``),
checkpoint steps and the last step. The CUDA counterpart, with ``torch.cuda.set_sync_debug_mode``, is in
``test_cuda_loop.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from pretrain_helpers import PRETRAIN, ROOT, TIMEOUT, TINY, complete_json, describe, env

from swinv2.train.checkpoint_manager import CheckpointManager

pytestmark = pytest.mark.slow

PROBE = str(ROOT / "tests" / "helpers" / "loop_probe.py")
LOG_EVERY, CHECKPOINT_EVERY, SIGTERM_AT = 5, 7, 11


def reads_from_this_repository(record: dict) -> list[dict]:
    """Host reads made by code of this repository (the loop, the run's compute_loss, the model, checkpointing)."""
    return [r for r in record["reads"] if not r["where"].startswith("/")]


def test_no_host_read_between_sync_steps_and_sigterm_stops_at_the_next_sync_step(tmp_path):
    out, record = tmp_path / "run", tmp_path / "record.json"
    # Sync steps: every 5th (reports) and every 7th (checkpoints). SIGTERM arrives as step 11 begins; the ranks next
    # agree at step 14, a checkpoint step, so the run checkpoints there and stops.
    cmd = [sys.executable, PROBE, str(record), PRETRAIN, *TINY, f"run.output_dir={out}", f"run.log_every={LOG_EVERY}",
           f"checkpoint.every_steps={CHECKPOINT_EVERY}", "run.image_every=0"]
    result = subprocess.run(cmd, cwd=ROOT, env={**env(), "LOOP_PROBE_SIGTERM_AT": str(SIGTERM_AT)},
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, describe(result)
    stopped = 2 * CHECKPOINT_EVERY
    assert f"preemption signal received: checkpointing at step {stopped} and stopping" in result.stdout
    assert f"stopped at step {stopped} (preempted)" in result.stdout, describe(result)
    assert CheckpointManager(out / "checkpoints", 2, 0).complete_tags() == [f"step{s:08d}" for s in (7, stopped)]
    assert complete_json(out, stopped)["step"] == stopped

    probe = json.loads(Path(f"{record}.rank0").read_text())
    assert probe["boundaries"] == list(range(1, stopped + 1))  # the probe saw every optimizer step
    sync_steps = {s for s in range(1, stopped + 1) if s % LOG_EVERY == 0 or s % CHECKPOINT_EVERY == 0}
    ours = reads_from_this_repository(probe)
    inside_steps = [r for r in ours if r["phase"][0] == "step"]
    assert not inside_steps, inside_steps  # forward, backward and optimizer step: never
    between = [r for r in ours if r["phase"][0] == "after" and r["phase"][1] not in sync_steps]
    assert not between, between  # reporting, checkpointing and fetching the next batch: only after sync steps
    # The instrument catches the loop's reads: the agreement of the ranks is read at every sync step.
    agreed = {r["phase"][1] for r in ours
              if r["where"].startswith("swinv2/train/nonfinite.py") and r["method"] == "tolist"}
    assert agreed == sync_steps
    # For the record: DeepSpeed's own reads inside a step (fp32 ZeRO-1 on the CPU checks the gradient norm with
    # bool() and torch's non-fused AdamW reads its step count with item(); see README, "Syncs").
    library = Counter((r["method"], re.sub(r".*site-packages/", "", r["where"])) for r in probe["reads"]
                      if r["where"].startswith("/") and r["phase"][0] == "step")
    print("library reads inside steps:", dict(library))
