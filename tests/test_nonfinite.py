"""A non-finite loss under ``run.on_nonfinite`` = ``skip``, ``rollback`` and ``stop``, on 2 ranks through the real
``deepspeed`` launcher (gloo, CPU). The loss of one rank in one step is made non-finite by a test-only wrapper
around the run's ``compute_loss`` (``tests/helpers/loop_probe.py``, ``LOOP_PROBE_NONFINITE``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_helpers import BIN, PRETRAIN, ROOT, TIMEOUT, TINY, complete_json, describe, env, free_port, wandb_history

from swinv2.train.checkpoint_manager import CheckpointManager
from swinv2.train.consolidate import consolidated_state_dict

pytestmark = pytest.mark.slow

PROBE = str(ROOT / "tests" / "helpers" / "loop_probe.py")
TWO_RANKS = ["data.batch_size=4", "data.samples_per_epoch=40"]  # 8 images per step, 10 steps per epoch, as TINY
# One sentence (exit 2), no traceback; TINY runs fp32 with optim.clip_grad=5.
MESSAGE = ("error: the loss became non-finite at step {step} (last value {value} on rank {rank}){why}: lower "
           "optim.base_lr or optim.clip_grad (now 5); the last checkpoint is intact")


def probe_run(out: Path, inject: str, *overrides: str, world: int = 2) -> subprocess.CompletedProcess:
    record = out.parent / "record.json"
    launcher = [str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port())]
    cmd = [*(launcher if world > 1 else [sys.executable]), PROBE, str(record), PRETRAIN, *TINY,
           *(TWO_RANKS if world > 1 else []), f"run.output_dir={out}", "run.image_every=0", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env={**env(), "LOOP_PROBE_NONFINITE": inject}, capture_output=True,
                          text=True, timeout=TIMEOUT)


def injected(out: Path, rank: int) -> list[int]:
    return json.loads((out.parent / f"record.json.rank{rank}").read_text())["injected"]


def final_weights_are_finite(out: Path) -> bool:
    state = consolidated_state_dict(out)
    return bool(state) and all(bool(t.isfinite().all()) for t in state.values())


def test_skip_drops_the_update_on_every_rank_counts_it_and_finishes(tmp_path):
    out = tmp_path / "run"
    # Rank 1's loss at step 3 becomes +inf, which leaves its gradients finite: only the loop's gate (a non-finite
    # loss multiplies the backward by NaN) makes DeepSpeed see the step as an overflow and drop it on both ranks.
    result = probe_run(out, "3:1:inf", "run.on_nonfinite=skip", "run.log_every=2", "run.max_steps=6",
                       "wandb.mode=offline")
    assert result.returncode == 0, describe(result)
    assert injected(out, 1) == [3] and injected(out, 0) == []
    assert ("non-finite loss in 1 step(s) up to step 4, the first at step 3 (value inf on rank 1): their updates "
            "were skipped on every rank (1 skipped so far)") in result.stdout, describe(result)
    assert "stopped at step 6 (max_steps)" in result.stdout
    history = wandb_history(next((out / "wandb").glob("offline-run-*/run-*.wandb")))
    assert history[2]["train/nonfinite_skipped"] == 0
    for step in (4, 6):
        row = history[step]
        assert row["train/nonfinite_skipped"] == 1 and row["train/nonfinite_steps"] == 1
        # DeepSpeed's own count, reported by rank 0, whose loss was finite: it dropped its update too.
        assert row["train/skipped_steps"] == 1
        assert math.isfinite(row["train/loss"])  # the window's mean leaves the non-finite micro batch out
    assert history[6]["train/rollbacks"] == 0
    assert final_weights_are_finite(out)


def test_rollback_reloads_the_last_checkpoint_and_goes_on_with_a_fresh_data_epoch(tmp_path):
    out = tmp_path / "run"
    # Checkpoints at steps 3 and 6 (if it gets there); reports at 2, 4, 6, 8. Rank 0's loss at step 5 is NaN: the
    # ranks see it at step 6, before that checkpoint is written, and go back to step 3's.
    result = probe_run(out, "5:0:nan", "run.on_nonfinite=rollback", "run.log_every=2", "checkpoint.every_steps=3",
                       "run.max_steps=8", "wandb.mode=offline")
    assert result.returncode == 0, describe(result)
    assert injected(out, 0) == [5]
    assert (f"non-finite loss at step 5 (value nan on rank 0): rolling back to {out / 'checkpoints' / 'step00000003'} "
            "(step 3) and going on with data epoch 1 (rollback 1 of at most 3)") in result.stdout, describe(result)
    assert "stopped at step 8 (max_steps)" in result.stdout
    assert CheckpointManager(out / "checkpoints", 2, 0).complete_tags() == ["step00000006", "step00000008"]
    # Epoch 0 was left at the rollback and steps 4-8 ran in epoch 1; without it the run would end in epoch 0 and
    # store 1 (the epoch a resumed run starts).
    assert complete_json(out, 8)["data_epoch"] == 2
    assert complete_json(out, 6)["data_epoch"] == 1
    # wandb's rows go at optimizer updates done, which only grow: the rollback at step 6 (6 updates) went back to
    # step 3, so steps 4, 6, 8 of the second pass are updates 7, 9, 11 (logged at steps 4, 6, 8, wandb dropped them:
    # its step had passed 6).
    history = wandb_history(next((out / "wandb").glob("offline-run-*/run-*.wandb")))
    passes = [(row["train/step"], row["train/rollbacks"]) for _, row in sorted(history.items()) if "train/loss" in row]
    assert passes == [(2, 0), (4, 0), (4, 1), (6, 1), (8, 1)], passes
    assert {row["train/step"]: updates for updates, row in history.items() if "train/loss" in row} == {
        2: 2, 4: 7, 6: 9, 8: 11}
    assert history[11]["train/rollbacks"] == 1 and history[11]["train/nonfinite_steps"] == 1
    assert math.isfinite(history[11]["train/loss"])
    assert final_weights_are_finite(out)


def test_stop_ends_every_rank_with_the_message_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = probe_run(out, "3:1:nan", "run.on_nonfinite=stop", "run.log_every=2", "checkpoint.every_steps=2",
                       "run.max_steps=8", "wandb.mode=disabled")
    assert result.returncode != 0, describe(result)
    assert result.stderr.count(MESSAGE.format(step=3, value="nan", rank=1, why="") + "\n") == 2, describe(result)
    assert "Traceback" not in result.stderr
    assert CheckpointManager(out / "checkpoints", 2, 0).complete_tags() == ["step00000002"]


def test_rollbacks_run_out_and_the_run_stops_with_the_message(tmp_path):
    out = tmp_path / "run"
    # Step 4's loss is NaN every time it runs: one rollback to step 2 is allowed, the second time it stops.
    # Without clipping the advice is to turn it on, not to lower it.
    result = probe_run(out, "4:0:nan:always", "run.on_nonfinite=rollback", "run.max_rollbacks=1",
                       "run.log_every=2", "checkpoint.every_steps=2", "run.max_steps=8", "wandb.mode=disabled",
                       "optim.clip_grad=0", world=1)
    assert result.returncode == 2, describe(result)
    assert injected(out, 0) == [4, 4]
    assert result.stdout.count("rolling back to") == 1, describe(result)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the loss became non-finite at step 4 (last value nan on rank 0) and 1 rollback(s) used up "
        "run.max_rollbacks=1: lower optim.base_lr or turn gradient clipping on (optim.clip_grad=1.0; it is off); "
        "the last checkpoint is intact"), describe(result)
    assert "Traceback" not in result.stderr
    assert CheckpointManager(out / "checkpoints", 2, 0).complete_tags() == ["step00000002"]


def test_skip_stops_after_max_consecutive_skips_with_one_sentence(tmp_path):
    out = tmp_path / "run"
    # Every step from 3 on is NaN (a run that diverged for good); syncs at 2, 4, 6: at 4 two in a row were skipped,
    # at 6 four, past the limit of 3. Without the limit it skipped to step 8 and exited 0.
    result = probe_run(out, "3-99:0:nan", "run.on_nonfinite=skip", "run.max_consecutive_skips=3", "run.log_every=2",
                       "checkpoint.every_steps=2", "run.max_steps=8", "wandb.mode=disabled", world=1)
    assert result.returncode == 2, describe(result)
    assert injected(out, 0) == [3, 4, 5, 6]
    assert "(2 skipped so far)" in result.stdout, describe(result)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the loss was non-finite in all 4 steps from 3 to 6 (run.max_consecutive_skips=3), so the run has "
        "diverged: lower optim.base_lr or optim.clip_grad (now 5), and resume from the last checkpoint, which is "
        "intact"), describe(result)
    assert "Traceback" not in result.stderr
    # Step 4's checkpoint holds the weights of step 2 (the skipped updates were dropped); it stays the last one.
    assert CheckpointManager(out / "checkpoints", 2, 0).complete_tags() == ["step00000002", "step00000004"]


def test_skip_without_an_overflow_check_is_a_config_error(tmp_path):
    # fp32 without ZeRO: the config says so before anything is written.
    out = tmp_path / "run"
    result = probe_run(out, "", "run.on_nonfinite=skip", "deepspeed.zero_stage=0", "wandb.mode=disabled", world=1)
    assert result.returncode == 2, describe(result)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: run.on_nonfinite=skip needs an optimizer that drops non-finite updates, which fp32 without ZeRO has "
        "not: set deepspeed.zero_stage to 1 or more, or use run.on_nonfinite=rollback.")
    assert not (out / "config.yaml").exists()
    # bf16 with DeepSpeed's overflow check turned off (only visible on the built engine): the loop refuses it.
    extra = tmp_path / "no_overflow_check.json"
    extra.write_text(json.dumps({"bf16": {"check_grad_overflow": False}}))
    result = probe_run(tmp_path / "bf16", "", "run.on_nonfinite=skip", "deepspeed.precision=bf16",
                       f"deepspeed.extra_json={extra}", "wandb.mode=disabled", world=1)
    assert result.returncode == 2, describe(result)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: run.on_nonfinite=skip needs DeepSpeed to drop updates with non-finite gradients, which fp32 without "
        "ZeRO and bf16 with check_grad_overflow off do not: set deepspeed.zero_stage to 1 or more (and leave "
        "bf16.check_grad_overflow on), or use run.on_nonfinite=rollback")
