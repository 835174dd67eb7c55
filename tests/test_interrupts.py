"""Every way a run ends, with persistent DataLoader workers: Ctrl-C (once: checkpoint and exit 130; twice: stop at
once), a broken stdout pipe, a crash inside ``compute_loss`` and SIGTERM at an epoch boundary, each a real
``launch/pretrain.py`` subprocess (through tests/helpers/exit_probe.py) in its own process group, as a terminal or
SLURM would signal it. Each must exit within 60 s and leave no process behind (before the fix a crash hung for ever
in multiprocessing's exit handler, joining a worker that ignores SIGTERM). The crash is then resumed, and the
resumed batches (webdataset keys) must be a fresh stream, not the epoch's first batches again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch
from helpers.pretrain_helpers import BIN, ROOT, TINY, complete_json, env, free_port, kill_group

PROBE = str(ROOT / "tests" / "helpers" / "exit_probe.py")
# TINY with two persistent workers and 4 steps per epoch (12 in all); KEYS lines say which batch the loop took.
ARGS = [*TINY, "data.num_workers=2", "data.samples_per_epoch=32"]
STEPS_PER_EPOCH = 4
EXIT_WITHIN = 60  # seconds from the event to the run's exit (the bound; a hang is what it catches)


def _start(out: Path, *overrides: str, launcher: bool = False, **extra_env: str) -> subprocess.Popen:
    runner = [str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port())] if launcher else [
        sys.executable]
    return subprocess.Popen([*runner, PROBE, *ARGS, f"run.output_dir={out}", *overrides], cwd=ROOT,
                            env={**env(), "PROBE_KEYS": "1", **extra_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _keys(text: str) -> list[tuple[int, list[str]]]:
    """``[(data epoch, keys)]`` of the batches the step loop took, in order."""
    return [(int(parts[1]), parts[2:]) for parts in (line.split() for line in text.splitlines())
            if parts[:1] == ["KEYS"]]


def _act(proc: subprocess.Popen, case: str, lines: list[str], family: list[psutil.Process]) -> bool:
    """Do the case's action once its trigger line has come; True when done."""
    batches = _keys("".join(lines))
    group = os.getpgid(proc.pid)
    if case == "sigterm_at_epoch_boundary" and len(batches) > STEPS_PER_EPOCH:  # the first batch of epoch 1
        os.killpg(group, signal.SIGTERM)
    elif case.startswith("ctrl_c") and len(batches) >= 2:
        os.killpg(group, signal.SIGINT)
    elif case == "broken_pipe" and len(batches) >= 2:
        proc.stdout.close()  # the run's next print fails with EPIPE
    else:
        return False
    family.extend(psutil.Process(proc.pid).children(recursive=True))
    return True


def _run_case(proc: subprocess.Popen, case: str) -> tuple[str, int, list[psutil.Process]]:
    """Read the run's output, act on it as ``case`` says, wait for the exit (a watchdog kills a hung run's
    group); returns the output, the exit status and the run's processes (children included) seen when it acted."""
    watchdog = threading.Timer(400, kill_group, [proc])
    watchdog.daemon = True
    watchdog.start()
    lines: list[str] = []
    family = [psutil.Process(proc.pid)]
    acted, second_sent = case == "raise_in_loss", False
    try:
        for line in proc.stdout:
            lines.append(line)
            if case == "raise_in_loss" and len(family) == 1 and _keys(line):
                family.extend(psutil.Process(proc.pid).children(recursive=True))
            if not acted:
                acted = _act(proc, case, lines, family)
                if case == "broken_pipe" and acted:
                    break
            elif case == "ctrl_c_twice" and not second_sent and line.startswith("Ctrl-C: saving a checkpoint"):
                os.killpg(os.getpgid(proc.pid), signal.SIGINT)  # the first one was seen: this is a second press
                second_sent = True
        proc.wait(timeout=EXIT_WITHIN)
    finally:
        watchdog.cancel()
        kill_group(proc)
    assert acted, "".join(lines)[-3000:]
    return "".join(lines), proc.returncode, family


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ctrl_c", "ctrl_c_twice", "ctrl_c_launcher", "broken_pipe", "raise_in_loss",
                                  "sigterm_at_epoch_boundary"])
def test_every_exit_path_ends_promptly_and_leaves_no_process_behind(tmp_path, case):
    out = tmp_path / "run"
    extra = {"PROBE_RAISE_AT": "6"} if case == "raise_in_loss" else {}
    # ctrl_c_twice: no sync step before the end, so the run is still training when the second Ctrl-C comes.
    # ctrl_c: a Ctrl-C checkpoints even where a finished run would not (checkpoint.at_end=false).
    overrides = ["checkpoint.every_steps=3"] + (["run.log_every=1000"] if case == "ctrl_c_twice" else []) + \
        (["checkpoint.at_end=false"] if case == "ctrl_c" else [])
    text, rc, family = _run_case(_start(out, *overrides, launcher=case == "ctrl_c_launcher", **extra), case)
    assert len(family) >= 3, f"the run and its two loader workers: {family}\n{text[-3000:]}"
    gone, alive = psutil.wait_procs(family, timeout=30)  # reparented orphans would linger here
    assert not alive, f"left behind: {alive}\n{text[-3000:]}"
    # The deepspeed runner dies of the Ctrl-C at once (DeepSpeed's code, its traceback included): not ours to check.
    expected = {"ctrl_c": 130, "ctrl_c_twice": 130, "raise_in_loss": 1, "sigterm_at_epoch_boundary": 0}
    assert rc == expected[case] if case in expected else rc != 0, f"rc={rc}\n{text[-3000:]}"
    if case == "ctrl_c_launcher":  # launch forwards a SIGTERM; the rank, stopping for the Ctrl-C already, saves
        step = len(_keys(text))
        assert f"Ctrl-C: stopped at step {step} with a checkpoint" in text, text[-3000:]
        assert complete_json(out, step)["step"] == step
    if case == "ctrl_c":
        step = len(_keys(text))
        assert "Ctrl-C: saving a checkpoint at the next sync step" in text, text[-3000:]
        assert f"Ctrl-C: stopped at step {step} with a checkpoint" in text, text[-3000:]
        assert complete_json(out, step)["step"] == step
        assert "Traceback" not in text, text[-3000:]
    if case == "ctrl_c_twice":
        assert "stopped by Ctrl-C" in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
    if case == "sigterm_at_epoch_boundary":
        assert "preemption signal received: checkpointing at step" in text, text[-3000:]
    if case == "raise_in_loss":
        assert "probe: forward 6 fails" in text, text[-3000:]
        _resumed_batches_are_fresh(out, text)


def _resumed_batches_are_fresh(out: Path, crashed: str) -> None:
    """Resume the run that crashed in step 6 (its last checkpoint: step 3, data epoch 0) for three steps: they must
    be the stream the resume step salts, not the epoch's first three batches again."""
    resumed = subprocess.run([sys.executable, PROBE, *ARGS, f"run.output_dir={out}", "run.max_steps=6"], cwd=ROOT,
                             env={**env(), "PROBE_KEYS": "1"}, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    before, after = _keys(crashed), _keys(resumed.stdout)
    assert [epoch for epoch, _ in before] == [0, 0, 0, 0, 1, 1] and [epoch for epoch, _ in after] == [0, 0, 0]
    assert [keys for _, keys in after] != [keys for _, keys in before[:3]]  # the replay the bug gave
    assert [keys for _, keys in after] == _reference_keys(resumed_at=3)[:3]
    assert [keys for _, keys in before[:4]] == _reference_keys(resumed_at=0)  # the crashed run's own epoch 0


def _reference_keys(resumed_at: int) -> list[list[str]]:
    """Epoch 0's batches (keys) from the stream function itself: worker i % 2 gives batch i."""
    from simmim.config import PretrainConfig
    from swinv2.data import build_loader
    from swinv2.train.config import load_config

    cfg = load_config(PretrainConfig, ROOT / "configs" / "demo.yaml", ARGS)
    loader = build_loader(cfg.data, "pretrain", lambda image: torch.zeros(1), 0, 1, img_size=cfg.model.img_size)
    per_worker = [[b["key"] for b in loader.stream.worker_batches(w, 2, 0, resumed_at)] for w in range(2)]
    return [per_worker[i % 2][i // 2] for i in range(STEPS_PER_EPOCH)]
