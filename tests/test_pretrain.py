"""End-to-end SimMIM pretraining through ``launch/pretrain.py`` and ``launch/convert.py``: real DeepSpeed on CPU
(gloo), real subprocesses and signals, real demo shards, wandb offline. No mocks.

One tiny demo run (the demo config shrunk by ``pretrain_helpers.TINY``) is shared by several tests: its loss,
console and wandb logs, checkpoint and reconstruction PNGs; a preemption (SIGTERM) and resume at the same step and
LR; a kill -9 in the middle of a checkpoint write; rerunning a finished run; the export to safetensors and loading
the encoder at another resolution and window; config errors; and resuming it on two processes through DeepSpeed's
universal checkpoint. The first DeepSpeed start on a fresh machine JIT-builds a small op (about 90 s, once).
The two-process loss-curve parity of ZeRO-2/3 is in ``test_pretrain_dist.py``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_helpers import (
    CONVERT,
    ROOT,
    STEP_LINE,
    STEPS_PER_EPOCH,
    TIMEOUT,
    TINY,
    TOTAL_STEPS,
    WARMUP_STEPS,
    complete_json,
    describe,
    env,
    kill_group,
    pretrain_cmd,
    run,
    start,
    step_lines,
    wandb_history,
)

import swinv2
from simmim.config import PretrainConfig
from simmim.pretrain import build_simmim
from swinv2.train.checkpoint_manager import CheckpointManager
from swinv2.train.config import ConfigError, load_config
from swinv2.train.consolidate import consolidated_state_dict
from swinv2.train.engine import scaled_lrs
from swinv2.train.optim import lr_at

DEMO = ROOT / "configs" / "demo.yaml"
DEMO_STEPS = 20


def tiny_config(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, DEMO, [*TINY, *overrides])


def schedule_lr(step: int, cfg: PretrainConfig) -> float:
    """The LR optimizer step ``step`` (0-based) applies, straight from the schedule definition."""
    accumulation = cfg.deepspeed.global_batch // cfg.data.batch_size  # one process
    assert cfg.data.samples_per_epoch // cfg.data.batch_size // accumulation == STEPS_PER_EPOCH
    return lr_at(step, total_steps=TOTAL_STEPS, warmup_steps=WARMUP_STEPS, kind=cfg.schedule.kind, **scaled_lrs(cfg))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """20 steps of the tiny demo in one plain ``python`` process, wandb offline, a reconstruction every 10 steps."""
    out = tmp_path_factory.mktemp("demo") / "run"
    started = time.perf_counter()
    result = run(pretrain_cmd(out, f"run.max_steps={DEMO_STEPS}", "wandb.mode=offline", "run.image_every=10"))
    assert result.returncode == 0, describe(result)
    print(f"demo run: {time.perf_counter() - started:.1f} s")
    return out, result


@pytest.mark.slow
def test_demo_run_learns_and_writes_checkpoint_wandb_and_images(demo_run):
    out, result = demo_run
    lines = step_lines(result.stdout)
    assert sorted(lines) == list(range(1, DEMO_STEPS + 1)), describe(result)
    assert all(line["total"] == TOTAL_STEPS for line in lines.values())
    assert f"stopped at step {DEMO_STEPS} (max_steps)" in result.stdout

    # Loss decreases: single steps are noisy (a new batch each step), so compare the first and last 5 steps.
    losses = [lines[s]["loss"] for s in sorted(lines)]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.9 * first, losses

    # The checkpoint of the last step, marked complete, with the client state; no periodic ones (every 1000 steps).
    checkpoints = out / "checkpoints"
    assert CheckpointManager(checkpoints, 2, 0).complete_tags() == [f"step{DEMO_STEPS:08d}"]
    meta = complete_json(out, DEMO_STEPS)
    assert meta["step"] == DEMO_STEPS and meta["world_size"] == 1
    assert meta["data_epoch"] == DEMO_STEPS // STEPS_PER_EPOCH  # two epochs done: a resumed run starts the third
    assert list((checkpoints / f"step{DEMO_STEPS:08d}").glob("*optim_states.pt"))
    # The resolved config is saved next to the checkpoints and loads back as the same config.
    assert load_config(PretrainConfig, out / "config.yaml") == tiny_config(
        f"run.output_dir={out}", f"run.max_steps={DEMO_STEPS}", "wandb.mode=offline", "run.image_every=10")

    # Reconstruction grids (every 10 steps): 8 rows of original | masked | pasted | prediction at 64 px.
    from PIL import Image

    pngs = sorted(p.name for p in (out / "images").iterdir())
    assert pngs == ["reconstruction_00000010.png", "reconstruction_00000020.png"]
    with Image.open(out / "images" / pngs[-1]) as image:
        assert image.mode == "RGB" and image.size == (4 * 64, 8 * 64)
        pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (8 * 64, 4 * 64, 3) and pixels.std() > 10

    # wandb offline: one run directory whose id the checkpoint stores (a resumed run continues it), holding every
    # step's metrics (matching the console) and the reconstruction images.
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(meta["wandb_id"])
    history = wandb_history(runs[0] / f"run-{meta['wandb_id']}.wandb")
    assert sorted(history) == list(range(1, DEMO_STEPS + 1))
    cfg = tiny_config()
    for step, row in history.items():
        assert row["train/loss"] == pytest.approx(lines[step]["loss"], rel=1e-3)
        # train/lr is the LR this step applied: the schedule's value before step `step` (1-based) was taken.
        assert row["train/lr"] == pytest.approx(schedule_lr(step - 1, cfg), rel=1e-9)
        assert math.isfinite(row["train/grad_norm"]) and row["train/images_per_s"] > 0
        assert row["train/skipped_samples"] == 0 and row["train/skipped_steps"] == 0
    assert [s for s, row in history.items() if any(k.startswith("reconstruction") for k in row)] == [10, 20]


def _watchdog(proc: subprocess.Popen) -> threading.Timer:
    """Kill a background run that hangs, so reading its output cannot block the test for ever."""
    timer = threading.Timer(TIMEOUT, kill_group, [proc])
    timer.daemon = True
    timer.start()
    return timer


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_at_same_step_and_lr(tmp_path, demo_run):
    out = tmp_path / "run"
    # SIGTERM to the whole process group, as SLURM's preemption and the deepspeed launcher send it, so the DataLoader
    # worker gets it too: it must survive, for the main process still fetches the micro batches (4 accumulated per
    # step here; same global batch and schedule as the demo run) that finish the current step before checkpointing.
    overrides = ["data.num_workers=1", "data.batch_size=2"]
    proc = start(pretrain_cmd(out, *overrides, f"run.max_steps={DEMO_STEPS}"))
    timer = _watchdog(proc)
    lines, sent_after = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            m = STEP_LINE.match(line)
            if m and sent_after is None and int(m[1]) >= 3:
                sent_after = int(m[1])
                os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        timer.cancel()
        kill_group(proc)
    text = "".join(lines)
    assert rc == 0 and sent_after is not None, text[-4000:]
    m = re.search(r"preemption signal received: checkpointing at step (\d+) and stopping", text)
    assert m, text[-4000:]
    stopped = int(m[1])
    assert sent_after <= stopped < DEMO_STEPS
    assert max(step_lines(text)) == stopped  # it stopped at the first step boundary after the signal
    assert f"stopped at step {stopped} (preempted)" in text
    assert CheckpointManager(out / "checkpoints", 2, 0).complete_tags() == [f"step{stopped:08d}"]
    assert complete_json(out, stopped)["step"] == stopped

    # The same command with a larger max_steps resumes there: the next step is stopped + 1, at the LR of the
    # schedule for it, which is what the uninterrupted demo run logged for that step.
    result = run(pretrain_cmd(out, *overrides, f"run.max_steps={stopped + 2}"))
    assert result.returncode == 0, describe(result)
    assert f"resumed from {out / 'checkpoints' / f'step{stopped:08d}'} at step {stopped}" in result.stdout
    resumed = step_lines(result.stdout)
    assert sorted(resumed) == [stopped + 1, stopped + 2]
    assert resumed[stopped + 1]["lr"] == pytest.approx(schedule_lr(stopped, tiny_config(*overrides)), rel=1e-3)
    uninterrupted = step_lines(demo_run[1].stdout)
    assert resumed[stopped + 1]["lr_text"] == uninterrupted[stopped + 1]["lr_text"]
    assert resumed[stopped + 2]["lr_text"] == uninterrupted[stopped + 2]["lr_text"]
    assert complete_json(out, stopped + 2)["step"] == stopped + 2


@pytest.mark.slow
def test_rerunning_a_finished_run_leaves_its_checkpoint_alone(tmp_path, demo_run):
    # E.g. a requeued job: nothing is left to train, so nothing may be rewritten (a kill during such a rewrite would
    # damage a checkpoint that is already marked complete).
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run[0], run_dir)
    files = sorted((run_dir / "checkpoints").rglob("*"))
    stamps = [f.stat().st_mtime_ns for f in files]
    result = run(pretrain_cmd(run_dir, f"run.max_steps={DEMO_STEPS}", "wandb.mode=offline", "run.image_every=10"))
    assert result.returncode == 0, describe(result)
    assert f"at step {DEMO_STEPS}" in result.stdout and not step_lines(result.stdout)
    assert sorted((run_dir / "checkpoints").rglob("*")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps


def _has_files(folder: Path) -> bool:
    try:
        return any(folder.iterdir())
    except FileNotFoundError:  # pruned meanwhile
        return False


@pytest.mark.slow
def test_kill_9_during_checkpoint_write_leaves_previous_checkpoint_usable(tmp_path):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    every_step = ["checkpoint.every_steps=1", "checkpoint.keep_last=2"]
    log_path = tmp_path / "first.log"  # a file, not a pipe: nobody reads the output while the test polls
    killed_during_write = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(pretrain_cmd(out, *every_step, f"run.max_steps={DEMO_STEPS}"), cwd=ROOT, env=env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # A checkpoint is written every step; catch one in the act: its folder exists and holds a file (DeepSpeed
        # is writing) but has no complete.json yet, while an earlier checkpoint is complete. Then SIGKILL at once.
        deadline = time.monotonic() + TIMEOUT
        try:
            while proc.poll() is None and time.monotonic() < deadline and not killed_during_write:
                tags = sorted(p.name for p in checkpoints.glob("step*")) if checkpoints.is_dir() else []
                complete = [t for t in tags if (checkpoints / t / "complete.json").is_file()]
                writing = [t for t in tags if t not in complete and _has_files(checkpoints / t)]
                if complete and writing and writing[-1] > complete[-1]:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed_during_write = not (checkpoints / writing[-1] / "complete.json").is_file()
                time.sleep(0.001)
        finally:
            kill_group(proc)
    tags = sorted(p.name for p in checkpoints.glob("step*"))
    if not killed_during_write:
        # The write of a checkpoint this small takes milliseconds; on a loaded machine the poll can miss every
        # window (or the marker lands between the poll and the kill). Then leave what such a kill leaves: the
        # newest checkpoint's files cut short and no complete.json.
        assert len(tags) >= 2, log_path.read_text()[-4000:]
        newest = checkpoints / tags[-1]
        (newest / "complete.json").unlink()
        for f in newest.iterdir():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    unfinished = tags[-1]
    print(f"{unfinished}: {'killed while being written' if killed_during_write else 'write failure simulated'}, "
          f"holding {sorted(f.name for f in (checkpoints / unfinished).iterdir())}")
    assert not (checkpoints / unfinished / "complete.json").is_file()
    previous = CheckpointManager(checkpoints, 2, 0).complete_tags()[-1]
    assert previous < unfinished
    step = int(previous.removeprefix("step"))

    result = run(pretrain_cmd(out, *every_step, f"run.max_steps={step + 2}"))
    assert result.returncode == 0, describe(result)
    assert f"resumed from {checkpoints / previous} at step {step}" in result.stdout
    assert sorted(step_lines(result.stdout)) == [step + 1, step + 2]
    # The unfinished folder was rewritten (or pruned) by the new run's saves: every checkpoint left is complete.
    left = sorted(p.name for p in checkpoints.glob("step*"))
    assert left == [f"step{step + 1:08d}", f"step{step + 2:08d}"]
    assert all((checkpoints / t / "complete.json").is_file() for t in left)


@pytest.mark.slow
def test_convert_exports_the_trained_weights_and_the_encoder_loads_at_another_size(tmp_path, demo_run):
    from safetensors.torch import load_file

    out, _ = demo_run
    export = tmp_path / "export"
    result = run([sys.executable, CONVERT, str(out), str(export)])
    assert result.returncode == 0, describe(result)

    # In a one-process fp32 run DeepSpeed's module weights are the trained weights; they are saved in the model
    # states file, apart from the optimizer's fp32 partitions that convert consolidates (zero_to_fp32).
    model = load_file(export / "model.safetensors")
    states = torch.load(out / "checkpoints" / f"step{DEMO_STEPS:08d}" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    live = states["module"]
    assert set(model) == set(live)
    for key, value in live.items():
        assert model[key].dtype == torch.float32 and torch.equal(model[key], value.float()), key
    cfg = tiny_config()
    assert set(model) == set(build_simmim(cfg).state_dict())  # every tensor of the SimMIM model, nothing else

    encoder = load_file(export / "encoder.safetensors")
    assert encoder.keys() == {k.removeprefix("encoder.") for k in model if k.startswith("encoder.")}
    assert all(torch.equal(encoder[k], model[f"encoder.{k}"]) for k in encoder)

    # Fine-tuning set-up: a classifier at 128 px with window 8, told the windows it was pretrained with.
    pretrained_windows = [w[0] for w in build_simmim(cfg).encoder.stage_windows]  # 64 px / window 4 -> 4, 4, 4, 2
    classifier = swinv2.create_model(
        cfg.model.name, num_classes=10, img_size=128, window_size=8, embed_dim=16, depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1], pretrained_window_sizes=pretrained_windows)
    report = swinv2.load_checkpoint(classifier, export / "encoder.safetensors")
    assert sorted(report.missing) == ["head.bias", "head.weight"] and not report.unexpected
    assert any("coordinate tables rebuilt" in line for line in report.adapted), str(report)
    state = classifier.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder.items())
    with torch.no_grad():
        logits = classifier(torch.randn(2, 3, 128, 128))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.not_a_key=1", "model.not_a_key"),
        ("data.batch_size=eight", "data.batch_size"),
        ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
        ("deepspeed.precision=fp8", "deepspeed.precision"),
        ("simmim.mask_ratio=1.5", "simmim.mask_ratio"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        tiny_config(override)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=1", "optim.lr"),  # unknown key: found while loading the config
        ("deepspeed.global_batch=12", "deepspeed.global_batch"),  # 12 is no multiple of 8 x 1: needs the world size
    ],
)
@pytest.mark.slow
def test_launch_script_config_error_exits_2_with_one_line(tmp_path, override, key):
    result = run(pretrain_cmd(tmp_path / "run", override), timeout=120)
    assert result.returncode == 2, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], describe(result)
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_resume_on_two_processes_through_universal_checkpoint(tmp_path, demo_run):
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run[0], run_dir)  # the demo's world-size-1 checkpoint at step 20, its wandb run too
    before = consolidated_state_dict(run_dir / "checkpoints" / f"step{DEMO_STEPS:08d}")
    # Same global batch and schedule on two ranks (batch size and samples per epoch are per rank). The LRs are set
    # (almost) to zero for the resumed steps so that the weights after them must still equal the checkpoint's:
    # proof that the universal checkpoint loaded them.
    tiny_lr = ["optim.base_lr=1e-12", "optim.warmup_lr=0", "optim.min_lr=0"]
    overrides = ["data.batch_size=4", "data.samples_per_epoch=40", f"run.max_steps={DEMO_STEPS + 2}",
                 "wandb.mode=offline", *tiny_lr]
    result = run(pretrain_cmd(run_dir, *overrides, world=2))
    assert result.returncode == 0, describe(result)
    assert f"at step {DEMO_STEPS} (universal checkpoint: world size changed)" in result.stdout, describe(result)
    lines = step_lines(result.stdout)
    assert sorted(lines) == [DEMO_STEPS + 1, DEMO_STEPS + 2]
    assert all(line["total"] == TOTAL_STEPS for line in lines.values())
    # The schedule position came through the conversion too: step 21 applies the schedule's LR for index 20.
    assert lines[DEMO_STEPS + 1]["lr"] == pytest.approx(schedule_lr(DEMO_STEPS, tiny_config(*tiny_lr)), rel=1e-3)

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / f"step{DEMO_STEPS:08d}_universal" / "complete.json").is_file()
    meta = complete_json(run_dir, DEMO_STEPS + 2)
    assert meta["world_size"] == 2 and meta["step"] == DEMO_STEPS + 2
    after = consolidated_state_dict(checkpoints / f"step{DEMO_STEPS + 2:08d}")
    assert after.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-7, msg=key)

    # The resumed run continued the same wandb run (its id is in the checkpoint).
    wandb_id = complete_json(run_dir, DEMO_STEPS)["wandb_id"]
    assert meta["wandb_id"] == wandb_id
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(runs) == 2
    assert sorted(wandb_history(runs[-1] / f"run-{wandb_id}.wandb")) == [DEMO_STEPS + 1, DEMO_STEPS + 2]


@pytest.mark.slow
def test_bf16_run_trains_with_deepspeed_casting_only_parameters(tmp_path):
    # DeepSpeed 0.19's bf16 engine leaves buffers in float32 (the V2 coordinate tables): the run must still train.
    result = run(pretrain_cmd(tmp_path / "bf16", "deepspeed.precision=bf16", "run.max_steps=3"))
    assert result.returncode == 0, describe(result)
    losses = [v["loss"] for v in step_lines(result.stdout).values()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), describe(result)
