"""On a GPU: steady-state steps of the real step loop make no host-device sync between sync steps.

``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call (``item``, blocking copies,
``torch.cuda.synchronize``, ...) warn (PyTorch docs, ``torch.cuda.set_sync_debug_mode``).
``tests/helpers/loop_probe.py`` turns it on inside the steps after the third and after every step that is not a sync
step of the loop (report or last step), on a real ``launch/pretrain.py`` run, and records each warning with the code
that caused it.

- With DeepSpeed's own per-step host reads switched off (its throughput timer, which calls
  ``torch.cuda.synchronize()`` around every micro batch; the bf16 overflow check; gradient clipping, whose
  non-finite-norm test reads the norm), no sync at all.
- With the configs' settings (clipping at 5.0, the overflow check on), every sync comes from DeepSpeed's files,
  none from this repository (docs/pretraining.md, Syncs).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from pretrain_helpers import PRETRAIN, ROOT, TIMEOUT, TINY, describe, env

pytestmark = pytest.mark.cuda

PROBE = str(ROOT / "tests" / "helpers" / "loop_probe.py")
STEPS, LOG_EVERY = 12, 5
SYNC_STEPS = "5,10,12"  # reports and the last step
NO_DEEPSPEED_SYNCS = {"timers": {"throughput": {"enabled": False}}, "bf16": {"check_grad_overflow": False}}


def probe_run(tmp_path: Path, *overrides: str) -> dict:
    record = tmp_path / "record.json"
    cmd = [sys.executable, PROBE, str(record), PRETRAIN, *TINY, f"run.output_dir={tmp_path / 'run'}",
           f"run.max_steps={STEPS}", f"run.log_every={LOG_EVERY}", "run.image_every=0", "deepspeed.precision=bf16",
           *overrides]
    result = subprocess.run(cmd, cwd=ROOT, env={**env(), "LOOP_PROBE_SYNC_DEBUG": "1",
                                                 "LOOP_PROBE_SYNC_STEPS": SYNC_STEPS},
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, describe(result)
    probe = json.loads(Path(f"{record}.rank0").read_text())
    assert probe["boundaries"] == list(range(1, STEPS + 1))
    return probe


def test_sync_debug_mode_reports_a_sync_here():
    # The instrument itself: a read of a CUDA tensor warns.
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.ones(1, device="cuda").item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert any("synchroniz" in str(w.message) for w in caught)


def test_steady_state_steps_make_no_cuda_sync(tmp_path):
    extra = tmp_path / "no_deepspeed_syncs.json"
    extra.write_text(json.dumps(NO_DEEPSPEED_SYNCS))
    probe = probe_run(tmp_path, "optim.clip_grad=0", f"deepspeed.extra_json={extra}")
    assert probe["syncs"] == [], json.dumps(probe["syncs"][:20], indent=1)


def test_with_the_configs_settings_every_sync_is_deepspeeds(tmp_path):
    probe = probe_run(tmp_path)
    ours = [s for s in probe["syncs"] if not s["where"].startswith("/")]
    assert ours == [], json.dumps(ours[:20], indent=1)
    where = sorted({s["where"].split("site-packages/")[-1] for s in probe["syncs"]})
    print("DeepSpeed's syncs in steady-state steps:", where)
