"""Requeue after the preemption checkpoint under SLURM (swinv2/train/slurm.py).

SLURM's ``scontrol`` cannot run here, so a stand-in script on ``PATH`` plays it: it records its arguments and
answers ``show job`` with the ``Requeue=`` field the real one prints. Everything else is real: the SIGUSR1 reaches
the ranks of a real 2-rank DeepSpeed run, which checkpoints, calls the stand-in once from rank 0 and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path

import psutil
import pytest
from pretrain_helpers import BIN, PRETRAIN, TINY, free_port, signal_after_step, start

from swinv2.train.checkpoint_manager import CheckpointManager
from swinv2.train.slurm import requeue_job, requeue_wanted

STAND_IN = """#!{python}
import json, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["show", "job"]:
    print("JobId=" + sys.argv[3] + " JobName=pretrain Requeue={requeue} Restarts=0 BatchFlag=1")
sys.exit({exit_code})
"""


def stand_in(folder: Path, requeue: int = 1, exit_code: int = 0) -> tuple[dict[str, str], Path]:
    """An ``scontrol`` stand-in in ``folder``; returns the environment that finds it and its call log."""
    log = folder / "scontrol_calls.jsonl"
    exe = folder / "scontrol"
    exe.write_text(STAND_IN.format(python=sys.executable, log=str(log), requeue=requeue, exit_code=exit_code))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}, log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_requeue_wanted_follows_the_setting_then_the_jobs_requeue_flag(tmp_path):
    environ, log = stand_in(tmp_path, requeue=1)
    assert requeue_wanted(True, environ) and not requeue_wanted(False, environ)
    assert calls(log) == []  # an explicit setting asks nobody
    assert requeue_wanted(None, environ)
    assert calls(log) == [["show", "job", "4242"]]
    environ, _ = stand_in(tmp_path, requeue=0)
    assert not requeue_wanted(None, environ)
    outside = {k: v for k, v in environ.items() if k != "SLURM_JOB_ID"}
    assert not requeue_wanted(True, outside) and not requeue_wanted(None, outside)


def test_requeue_job_calls_scontrol_once_and_says_what_happened(tmp_path):
    environ, log = stand_in(tmp_path)
    assert requeue_job(environ) == "requeued SLURM job 4242: the next allocation resumes from the checkpoint"
    assert calls(log) == [["requeue", "4242"]]
    environ, log = stand_in(tmp_path, exit_code=1)
    assert "scontrol requeue 4242 failed" in requeue_job(environ)
    no_scontrol = {**environ, "PATH": str(BIN)}
    assert "resubmit the job" in requeue_job(no_scontrol)


@pytest.mark.slow
def test_sigusr1_under_slurm_checkpoints_requeues_once_from_rank_0_and_exits_0(tmp_path):
    environ, log = stand_in(tmp_path)
    out = tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), PRETRAIN, *TINY,
           f"run.output_dir={out}", "wandb.mode=disabled", "run.max_steps=300", "data.batch_size=4",
           "data.samples_per_epoch=40", "run.log_every=1"]
    proc = start(cmd, {"PATH": environ["PATH"], "SLURM_JOB_ID": "4242"})

    def ranks(runner: psutil.Process) -> list[psutil.Process]:  # SLURM's --signal=USR1@N signals every task
        found = [p for p in runner.children(recursive=True) if PRETRAIN in " ".join(p.cmdline())
                 and "deepspeed.launcher" not in " ".join(p.cmdline())]
        assert len(found) == 2, [p.cmdline() for p in found]
        return found

    text, sent = signal_after_step(proc, 2, ranks, signal.SIGUSR1)
    assert sent is not None, text[-3000:]
    stopped = int(text.split("stopped at step ")[1].split()[0])
    assert CheckpointManager(out / "checkpoints", 2, 0).complete_tags() == [f"step{stopped:08d}"], text[-3000:]
    # run.slurm_requeue is left at None: rank 0 alone asks whether the job has --requeue, then requeues it once.
    assert calls(log) == [["show", "job", "4242"], ["requeue", "4242"]], text[-3000:]
    assert "requeued SLURM job 4242" in text
    assert proc.returncode == 0, text[-3000:]
