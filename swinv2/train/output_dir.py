"""The run's output folder at start-up: writable, and held by one run at a time.

A lock file (``run.lock``) in the folder carries an exclusive ``flock`` for the whole life of the process that took
it: two runs writing into one folder would overwrite each other's checkpoints. The kernel drops the lock when the
process ends however it ends (a crash or SIGKILL included), so a lock is never stale; the file only records who
holds it (pid and host) for the message a refused run prints. Only rank 0 takes it: the other ranks of the same run
are no second run.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import IO

from .config import ConfigError

LOCK_NAME = "run.lock"
_held: dict[Path, IO[str]] = {}  # folder -> the open lock file, one per folder and process


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and write (then remove) a file in it; a :class:`ConfigError` if that fails, so a
    read-only folder is found before the engine is built rather than at the first checkpoint."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"run.output_dir {str(out)!r} is not writable ({reason}): set run.output_dir to a folder "
                          "you can write to") from None


def lock_output_dir(out: Path) -> IO[str]:
    """Take the run lock of ``out`` (an existing folder) for this process's life, or refuse with a
    :class:`ConfigError` naming the run that holds it. Locking a folder this process already holds (a run started
    again in the same process, e.g. a resume in a test) hands the lock over."""
    key = out.resolve()
    if key in _held:
        _held.pop(key).close()  # the same process: its earlier run is over
    handle = open(out / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the run's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not yet said who it is"
        handle.close()
        raise ConfigError(f"run.output_dir {str(out)!r} is in use by another run ({holder}): wait for it to end, "
                          "or set run.output_dir to another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held[key] = handle
    return handle


def release_output_dir(out: Path) -> None:
    """Drop this process's lock on ``out`` (a no-op if it holds none)."""
    handle = _held.pop(out.resolve(), None)
    if handle is not None:
        handle.close()
