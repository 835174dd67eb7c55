"""One run per output folder (a lock held for the run's life, free again once its process is gone, however it
ended), and a folder the run cannot write to refused at start-up; both one sentence and exit 2."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from helpers.pretrain_helpers import PRETRAIN, ROOT, TINY, env, run

from swinv2.train.config import ConfigError
from swinv2.train.output_dir import LOCK_NAME, lock_output_dir, release_output_dir

HOLDER = """
import sys, time
from pathlib import Path
from swinv2.train.output_dir import lock_output_dir
lock_output_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def _hold(folder) -> subprocess.Popen:
    """Another process holding ``folder``'s run lock, as a run does for its whole life."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _one_sentence(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_a_held_folder_is_refused_naming_the_holder_and_free_once_it_is_killed(tmp_path):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(ConfigError) as refused:
            lock_output_dir(tmp_path)
        assert f"is in use by another run (pid {holder.pid} on {socket.gethostname()})" in str(refused.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crash: nothing releases the lock but the kernel
        holder.wait()
    lock_output_dir(tmp_path)  # a lock left by a dead run is no lock
    assert (tmp_path / LOCK_NAME).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    release_output_dir(tmp_path)


@pytest.mark.slow
def test_a_second_run_into_a_used_folder_and_a_read_only_folder_exit_2_before_writing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold(out)
    try:
        result = run([sys.executable, PRETRAIN, *TINY, f"run.output_dir={out}"])
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    _one_sentence(result, f"run.output_dir {str(out)!r} is in use by another run (pid {holder.pid} on",
                  "set run.output_dir to another folder")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing of its own written

    if shutil.which("unshare") is None:
        pytest.skip("no unshare here to mount a read-only folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = f'mount --bind "{ro}" "{ro}" && mount -o remount,bind,ro "{ro}" && exec "$@"'
    result = run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", sys.executable,
                  PRETRAIN, *TINY, f"run.output_dir={ro}/run"])
    if "mount:" in result.stderr:
        pytest.skip(f"cannot bind-mount here: {result.stderr.strip()[:200]}")
    _one_sentence(result, f"run.output_dir {str(ro / 'run')!r} is not writable (Read-only file system)")
