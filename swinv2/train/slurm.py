"""Requeue a SLURM job after its preemption checkpoint.

SLURM requeues a job submitted with ``--requeue`` after a node failure or a preemption, but a job that reaches its
time limit simply ends (sbatch(1), ``--requeue``; scontrol(1), ``requeue``). With ``--signal=USR1@N`` every task is
warned N seconds before the limit; the run checkpoints on that signal, and then rank 0 asks SLURM to put the job
back in the queue, so the next allocation resumes from the checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping

TIMEOUT_S = 60  # scontrol talks to slurmctld; a hung controller must not keep the job from ending


def requeue_wanted(setting: bool | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether to requeue: ``run.slurm_requeue`` if set, else whether this SLURM job was submitted with
    ``--requeue`` (``Requeue=1`` in ``scontrol show job``). Never outside a SLURM job."""
    job = environ.get("SLURM_JOB_ID")
    if not job or setting is False:
        return False
    if setting:
        return True
    shown = _scontrol(["show", "job", job], environ)
    return bool(shown and re.search(r"\bRequeue=1\b", shown))


def requeue_job(environ: Mapping[str, str] = os.environ) -> str:
    """``scontrol requeue $SLURM_JOB_ID``; returns one line saying what happened (the caller prints it)."""
    job = environ["SLURM_JOB_ID"]
    if _scontrol(["requeue", job], environ) is None:
        return (f"scontrol requeue {job} failed (see above): the checkpoint is written; resubmit the job to continue, "
                "or requeue it by hand")
    return f"requeued SLURM job {job}: the next allocation resumes from the checkpoint"


def _scontrol(args: list[str], environ: Mapping[str, str]) -> str | None:
    """``scontrol args`` (found on ``environ``'s PATH); its stdout, or ``None`` (printing why) if it failed."""
    exe = shutil.which("scontrol", path=environ.get("PATH"))
    if exe is None:
        print("scontrol is not on PATH: cannot ask SLURM to requeue the job", flush=True)
        return None
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=TIMEOUT_S, env=dict(environ))
    except subprocess.TimeoutExpired:
        print(f"scontrol {' '.join(args)} did not answer within {TIMEOUT_S} s", flush=True)
        return None
    if done.returncode != 0:
        print(f"scontrol {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[:300]}", flush=True)
        return None
    return done.stdout
