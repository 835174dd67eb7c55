"""Helpers for the pretraining end-to-end tests: run ``launch/*.py`` and the deepspeed launcher as real
subprocesses, read their console lines and wandb's offline run files."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the virtual environment running pytest; its deepspeed launcher sits beside it
PRETRAIN = str(ROOT / "launch" / "pretrain.py")
CONVERT = str(ROOT / "launch" / "convert.py")
# The first DeepSpeed start on a fresh machine JIT-builds a small op (~90 s); later starts take seconds.
TIMEOUT = 420

# The demo's held-out loss and kNN probe (tests/test_pretrain_monitors.py covers them) cost more than these tiny runs.
NO_MONITORS = ["data.eval_urls=''", "probe.train_urls=''", "probe.eval_urls=''"]
# The demo config shrunk to seconds on 2 CPU cores: a 4-stage SwinV2 of width 16 at 64 px, 8 images per step,
# 10 steps per epoch and a 30-step schedule (3 warmup steps, then cosine), no DataLoader workers.
TINY = [
    "model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]",
    "data.batch_size=8", "deepspeed.global_batch=8", "data.num_workers=0", "data.samples_per_epoch=80",
    "schedule.epochs=3", "schedule.warmup_epochs=0.3", "checkpoint.every_steps=1000", "run.log_every=1",
    "wandb.mode=disabled", *NO_MONITORS,
]
STEPS_PER_EPOCH, TOTAL_STEPS, WARMUP_STEPS = 10, 30, 3

STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss (\S+) lr (\S+) ")


def env() -> dict[str, str]:
    """The subprocess environment: this venv first on PATH, unbuffered output, no wandb account settings."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONUNBUFFERED"] = "1"
    return out


def free_port() -> int:
    """A free TCP port for the deepspeed launcher (its default 29500 would clash with any concurrent run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_cmd(out: Path, *overrides: str, world: int = 1) -> list[str]:
    """``python launch/pretrain.py`` (one process) or ``deepspeed --num_gpus N launch/pretrain.py``."""
    args = [PRETRAIN, *TINY, f"run.output_dir={out}", *overrides]
    if world == 1:
        return [sys.executable, *args]
    return [str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()), *args]


def run(cmd: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def describe(result: subprocess.CompletedProcess) -> str:
    """The tail of a finished command's output, for assertion messages."""
    return f"rc={result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def step_lines(text: str) -> dict[int, dict]:
    """``{step: {"loss": float, "lr": float, "lr_text": str, "total": int}}`` from the console lines
    ``step S/T loss L lr R ...`` (printed when stderr is not a terminal)."""
    out = {}
    for line in text.splitlines():
        m = STEP_LINE.match(line)
        if m:
            out[int(m[1])] = {"total": int(m[2]), "loss": float(m[3]), "lr": float(m[4]), "lr_text": m[4]}
    return out


def start(cmd: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """A background run in its own process group (so the test can signal all of it, like SLURM does)."""
    return subprocess.Popen(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def signal_after_step(proc: subprocess.Popen, step: int, victims: Callable[[Any], Iterable[Any]],
                      sig: int = signal.SIGTERM) -> tuple[str, int | None]:
    """Read the run's output; at the first ``step S/T`` line with S >= ``step`` send ``sig`` to every process of
    ``victims(runner)`` (``runner``: the psutil.Process of ``proc``); returns the output and the step it was sent
    after (None: never). A watchdog kills the run's process group if it hangs."""
    import psutil

    timer = threading.Timer(TIMEOUT, kill_group, [proc])
    timer.daemon = True
    timer.start()
    lines, sent_after = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            m = STEP_LINE.match(line)
            if m and sent_after is None and int(m[1]) >= step:
                sent_after = int(m[1])
                for process in victims(psutil.Process(proc.pid)):
                    process.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        timer.cancel()
        kill_group(proc)
    return "".join(lines), sent_after


def kill_group(proc: subprocess.Popen) -> None:
    """Clean-up for a test that failed half way: SIGKILL the run's own process group (and only it)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def complete_json(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step{step:08d}" / "complete.json").read_text())


def wandb_history(run_file: Path) -> dict[int, dict]:
    """``{step: {key: value}}`` from an offline wandb run file (``run-<id>.wandb``), without wandb's servers.

    wandb 0.31 has no Python reader for it any more, so this decodes it: a 7-byte header (``:W&B``, magic, version)
    followed by LevelDB-log records (32 KiB blocks; each chunk a 7-byte header of crc32, length, type: 1 full,
    2 first, 3 middle, 4 last) holding serialized ``wandb_internal_pb2.Record`` messages.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a wandb run file"
    block, pos, pending, history = 32768, 7, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of a block (or of a file still being written)
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.setdefault(int(items["_step"]), {}).update(items)  # one step may come in several
    return history
