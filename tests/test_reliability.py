"""Faults and bad input, as a hostile user or a cluster would cause them, through the real entry points.

Every case runs ``launch/*.py`` (or the ``deepspeed`` launcher) as a real subprocess and checks what the user sees:
one ``error:`` line naming the thing and the fix, the exit code (2 for what the user can fix), what is left on disk,
and that nothing hangs (every subprocess has a wall-time bound). Crafted pickles prove their payload never ran;
a full disk is a real tmpfs mounted in a private mount namespace (``unshare``), SIGTERM goes through the
``deepspeed`` launcher with wandb offline on one and two ranks.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from pretrain_helpers import (
    BIN,
    CONVERT,
    PRETRAIN,
    ROOT,
    TINY,
    complete_json,
    describe,
    env,
    free_port,
    kill_group,
    pretrain_cmd,
    run,
    signal_after_step,
    start,
)

from swinv2.train.checkpoint_manager import CheckpointManager

EVALUATE = str(ROOT / "launch" / "evaluate.py")
FINETUNE = str(ROOT / "launch" / "finetune.py")
QUICK = 180  # seconds: a run that must fail at start-up, or a short one, under a loaded machine
LAUNCHER = 420  # seconds: a run through the deepspeed launcher (it starts several processes)


def one_error(result: subprocess.CompletedProcess, *needles: str, rc: int = 2) -> str:
    """The single ``error:`` line of a failed run, after checking the exit code and that no traceback leaked."""
    assert result.returncode == rc, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    for needle in needles:
        assert needle in errors[0], describe(result)
    return errors[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Two steps of the tiny demo with a checkpoint after each (wandb off): a run directory to resume and convert."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run(pretrain_cmd(out, "run.max_steps=2", "checkpoint.every_steps=1"), timeout=QUICK)
    assert result.returncode == 0, describe(result)
    return out


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file's size and time, except ``run.lock``: each start takes the run lock (its pid and host) before
    it reads anything else (docs/reliability.md, one run per output folder)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and p.name != "run.lock"}


# --- checkpoints that would run code ------------------------------------------------------------------------------

class _Payload:
    """Unpickling this makes the folder ``marker``: the proof that a file's code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _crafted_checkpoint(run_dir: Path, marker: Path, zero: bool) -> Path:
    """A complete-looking DeepSpeed checkpoint folder whose model states (and, for ``zero``, ZeRO optimizer
    states, which DeepSpeed's own ``zero_to_fp32`` reads) carry a payload."""
    folder = run_dir / "checkpoints" / "step00000005"
    folder.mkdir(parents=True)
    (folder / "complete.json").write_text(json.dumps({"step": 5, "world_size": 1}))
    torch.save({"module": {"encoder.w": _Payload(str(marker))}}, folder / "mp_rank_00_model_states.pt")
    if zero:
        optim = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        torch.save({"optimizer_state_dict": _Payload(str(marker))}, optim)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("zero", [False, True], ids=["model-states", "zero-optimizer-states"])
def test_convert_refuses_a_checkpoint_that_would_run_code(tmp_path, zero):
    marker = tmp_path / "payload-ran"
    folder = _crafted_checkpoint(tmp_path / "run", marker, zero)
    result = run([sys.executable, CONVERT, str(folder), str(tmp_path / "out")], timeout=QUICK)
    one_error(result, str(folder), "not loaded", "could run code")
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "out").exists()  # and nothing was written


@pytest.mark.slow
def test_pretrained_and_resume_refuse_a_checkpoint_that_would_run_code(tmp_path):
    marker = tmp_path / "payload-ran"
    folder = _crafted_checkpoint(tmp_path / "run", marker, zero=False)
    # pretrained= of a fine-tuning run (consolidation through our reader)
    result = run([sys.executable, FINETUNE, f"pretrained={tmp_path / 'run'}", f"run.output_dir={tmp_path / 'ft'}",
                  "wandb.mode=disabled", "data.num_workers=0"], timeout=QUICK)
    one_error(result, "not loaded", "could run code")
    assert not marker.exists()
    # resuming that directory as a pretraining run (DeepSpeed's engine.load_checkpoint, forced weights-only)
    result = run(pretrain_cmd(tmp_path / "run"), timeout=QUICK)
    one_error(result, str(folder), "could run code")
    assert not marker.exists()
    assert not (tmp_path / "run" / "config.yaml").exists()  # a refused resume writes no config


# --- resuming with settings that do not fit the checkpoint --------------------------------------------------------

@pytest.mark.parametrize(
    "override, needle",
    [
        ("deepspeed.global_batch=16", "deepspeed.global_batch=8 but the config says 16"),
        ("model.embed_dim=48", "model.embed_dim=16 but the config says 48"),
    ],
)
@pytest.mark.slow
def test_resume_refuses_another_global_batch_or_model_and_keeps_the_run_as_it_was(tmp_path, trained_run, override,
                                                                                  needle):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = _snapshot(run_dir)
    config = (run_dir / "config.yaml").read_text()
    result = run(pretrain_cmd(run_dir, override, "run.max_steps=4"), timeout=QUICK)
    one_error(result, needle, "resume=false", str(run_dir / "checkpoints" / "step00000002"))
    assert (run_dir / "config.yaml").read_text() == config  # the run's own config.yaml is not replaced
    assert _snapshot(run_dir) == before  # nor anything else


# --- bad input at start-up: one sentence, exit 2, nothing written --------------------------------------------------

@pytest.mark.slow
def test_bad_config_and_data_at_start_exit_2_with_one_sentence_and_write_nothing(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  name: [swinv2\n  img_size: 64\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--config", str(bad_yaml)], [str(bad_yaml), "not valid YAML at line 3"]),
        (["model.img_size=65"], ["model.img_size=65", "multiple of 32"]),
        ([f"data.train_urls={tmp_path}/missing-{{000..003}}.tar"], ["not found", "missing-"]),
        ([f"data.train_urls={empty}"], [str(empty), "holds no .tar shards"]),
    ]
    for i, (args, needles) in enumerate(cases):
        out = tmp_path / f"run{i}"
        overrides = [a for a in args if "=" in a]
        options = [a for a in args if "=" not in a]
        result = run([sys.executable, PRETRAIN, *options, *TINY, f"run.output_dir={out}", *overrides], timeout=QUICK)
        one_error(result, *needles)
        assert not out.exists(), f"{args}: {sorted(out.rglob('*'))}"  # no config.yaml, nothing


@pytest.mark.slow
def test_weights_errors_of_convert_and_evaluate_exit_2_with_one_sentence(tmp_path, trained_run):
    # A truncated .safetensors (an interrupted copy).
    exported = tmp_path / "exported"
    result = run([sys.executable, CONVERT, str(trained_run), str(exported)], timeout=QUICK)
    assert result.returncode == 0, describe(result)
    truncated = tmp_path / "cut.safetensors"
    data = (exported / "encoder.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    result = run([sys.executable, CONVERT, str(truncated), str(tmp_path / "again")], timeout=QUICK)
    one_error(result, str(truncated), "truncated")
    # Converting into an existing file instead of a folder.
    existing = tmp_path / "a-file"
    existing.write_text("keep me")
    result = run([sys.executable, CONVERT, str(trained_run), str(existing)], timeout=QUICK)
    one_error(result, str(existing), "existing file")
    assert existing.read_text() == "keep me"
    # Evaluating a folder that holds no checkpoint: say that, rather than ask for --model.
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    result = run([sys.executable, EVALUATE, str(empty), "--data", "demo:val"], timeout=QUICK)
    one_error(result, f"no complete checkpoint under '{empty}'")


@pytest.mark.slow
def test_exported_weights_get_the_users_umask(tmp_path, trained_run):
    exported = tmp_path / "exported"
    result = subprocess.run([sys.executable, CONVERT, str(trained_run), str(exported)], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=QUICK, preexec_fn=lambda: os.umask(0o027))
    assert result.returncode == 0, describe(result)
    for name in ("model.safetensors", "encoder.safetensors"):
        assert (exported / name).stat().st_mode & 0o777 == 0o640, name  # 0666 & ~027, not mkstemp's 0600


# --- preemption through the deepspeed launcher ----------------------------------------------------------------------

def _launcher_cmd(out: Path, world: int, *overrides: str) -> list[str]:
    per_rank = ["data.batch_size=4", "data.samples_per_epoch=40"] if world == 2 else []
    return [str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()), PRETRAIN, *TINY,
            f"run.output_dir={out}", "wandb.mode=offline", "run.max_steps=300", *per_rank, *overrides]


def _launch_process(runner: psutil.Process) -> psutil.Process:
    found = [p for p in runner.children(recursive=True) if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
    assert len(found) == 1
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize("world, target", [(1, "launch"), (2, "launch"), (1, "ranks")])
def test_sigterm_through_the_deepspeed_launcher_checkpoints_although_wandb_dies(tmp_path, world, target):
    out = tmp_path / "run"
    proc = start(_launcher_cmd(out, world))
    if target == "launch":
        text, sent_after = signal_after_step(proc, 3, lambda runner: [_launch_process(runner)])
    else:  # the ranks themselves: the children of launch
        text, sent_after = signal_after_step(proc, 3, lambda runner: _launch_process(runner).children())
    assert sent_after is not None, text[-4000:]
    # launch forwards SIGTERM to every process under it, wandb's service included; the ranks finish the step, and
    # neither wandb dying nor the signal costs the checkpoint.
    stopped = [int(line.split()[3]) for line in text.splitlines() if line.startswith("stopped at step ")]
    assert len(stopped) == 1 and "(preempted)" in text, text[-4000:]
    assert sent_after <= stopped[0] <= sent_after + 1
    assert "Traceback" not in text, text[-4000:]
    assert CheckpointManager(out / "checkpoints", 2, 0).complete_tags() == [f"step{stopped[0]:08d}"]
    assert complete_json(out, stopped[0])["world_size"] == world
    # DeepSpeed's launch exits 1 after forwarding a SIGTERM whatever its ranks return; signalled directly, the ranks
    # exit 0 and so do launch and the runner (docs/reliability.md).
    assert proc.returncode == (1 if target == "launch" else 0), text[-4000:]


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_runner_stops_the_orphaned_ranks_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = start(_launcher_cmd(out, 1))
    # The runner dies of it and passes nothing on; the rank sees its launcher orphaned and stops as if signalled.
    text, sent_after = signal_after_step(proc, 3, lambda runner: [runner])
    assert sent_after is not None and proc.returncode == -signal.SIGTERM, text[-4000:]
    assert "the deepspeed runner is gone: checkpointing at step" in text, text[-4000:]
    stopped = int(text.split("stopped at step ")[1].split()[0])
    assert CheckpointManager(out / "checkpoints", 2, 0).complete_tags() == [f"step{stopped:08d}"]
    assert "exits successfully" in text  # launch saw the rank exit 0 (and then ended itself)


# --- a full disk ----------------------------------------------------------------------------------------------------

def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_every_rank_with_one_sentence_and_keeps_the_last_checkpoint(tmp_path):
    if not _can_mount_tmpfs():
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (unshare --user --mount)")
    # A 20 MB tmpfs; each checkpoint of the tiny model on two ranks takes 11 MB and only the last one is kept,
    # so step 1's fits and step 2's does not. Everything runs inside the namespace, which the test cannot see:
    # the script lists what is left after the run.
    mount = tmp_path / "disk"
    mount.mkdir()
    out = mount / "run"
    command = shlex.join(_launcher_cmd(out, 2, "run.max_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=1",
                                     "data.num_workers=1"))
    script = (f"mount -t tmpfs -o size=20m tmpfs {mount} && cd {ROOT} && {command}; echo rc=$?; "
              f"for f in {out}/checkpoints/step*/*; do echo left $f; done; cat {out}/checkpoints/step*/complete.json")
    started = time.monotonic()
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                            env=env(), capture_output=True, text=True, timeout=LAUNCHER)
    print(f"full disk: a real 20 MB tmpfs; {time.monotonic() - started:.0f} s")
    text = result.stdout + result.stderr
    assert "rc=1" in result.stdout, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, text[-4000:]  # every rank says it and exits
    for line in errors:
        assert f"checkpoint step00000002 could not be written to {out / 'checkpoints'}" in line
        assert "MB are free there and a checkpoint needs about" in line
        assert "the last complete checkpoint, step00000001, is intact" in line
    left = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("left ")]
    assert sorted(Path(p).name for p in left if "/step00000001/" in p) == [
        "complete.json", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not [p for p in left if "/step00000002/" in p]  # nothing half-written
    assert '"step": 1' in result.stdout


@pytest.mark.slow
def test_a_write_failing_on_one_rank_stops_every_rank_without_a_hang(tmp_path):
    # The failure the free-space check cannot foresee: a write failing part way on one rank while the other has
    # written its share and waits in DeepSpeed's closing barrier. Injected at the write call: once the first
    # checkpoint is complete, rank 1 gets a 1 MB file size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the
    # write fails with EFBIG like a full disk's ENOSPC), and its 4 MB optimizer shard cannot be written.
    out = tmp_path / "run"
    proc = start(_launcher_cmd(out, 2, "run.max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=1",
                               "wandb.mode=disabled"))
    timer = threading.Timer(LAUNCHER, kill_group, [proc])
    timer.daemon = True
    timer.start()
    lines, limited = [], False
    started = time.monotonic()
    try:
        for line in proc.stdout:
            lines.append(line)
            if not limited and (out / "checkpoints" / "step00000001" / "complete.json").is_file():
                rank1 = [p for p in _launch_process(psutil.Process(proc.pid)).children()
                         if "--local_rank=1" in p.cmdline()]
                assert len(rank1) == 1
                rank1[0].rlimit(psutil.RLIMIT_FSIZE, (2**20, 2**20))
                limited = True
        proc.wait(timeout=60)
    finally:
        timer.cancel()
        kill_group(proc)
    text = "".join(lines)
    print(f"write failure injected on rank 1; {time.monotonic() - started:.0f} s")
    assert limited and proc.returncode not in (0, None), text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error: checkpoint step")]
    assert errors, text[-4000:]
    assert all("could not be written" in line and "MB are free there" in line for line in errors), errors
    failed = int(errors[0].split()[2].removeprefix("step"))
    complete = CheckpointManager(out / "checkpoints", 2, 0).complete_tags()
    assert complete == [f"step{failed - 1:08d}"]  # the one before is intact, the failed one is gone
    assert not (out / "checkpoints" / f"step{failed:08d}").exists()
