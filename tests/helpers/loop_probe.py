"""Run ``launch/pretrain.py`` (or any launch script) with instruments on the step loop, for the loop tests.

    python tests/helpers/loop_probe.py RECORD.json launch/pretrain.py key=value ...
    deepspeed --num_gpus 2 tests/helpers/loop_probe.py RECORD.json launch/pretrain.py ...   # RECORD.json.rank<r> each

Nothing is replaced: every instrument calls the real function and only records.

- Host reads: ``torch.Tensor.item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``, ``__float__``, ``__int__``,
  ``__index__`` and ``__format__`` are wrapped; each call is recorded with the loop phase it happened in and the
  innermost calling frame outside torch's own Python code (a file of this repository, or a library's).
- The loop phase comes from DeepSpeed's engine: ``["step", n]`` from the first ``engine.forward`` of optimizer step
  n until its boundary ``engine.step()`` returns; ``["after", n]`` from then (reporting, checkpointing, fetching
  the next batch) until step n + 1 begins.
- ``LOOP_PROBE_NONFINITE="step:rank:kind[:always]"`` makes rank ``rank``'s loss non-finite in optimizer step
  ``step`` (or every step of a range ``a-b``; ``kind`` ``nan``: multiplied by NaN; ``inf``: plus infinity, which
  leaves its gradients finite), the first time that step runs (or every time, with ``always``): a test-only
  wrapper around the ``compute_loss`` the run passes to ``swinv2.train.loop.train_loop``.
- ``LOOP_PROBE_SIGTERM_AT=n``: the process sends itself SIGTERM as optimizer step n begins (its first forward).
- ``LOOP_PROBE_SYNC_DEBUG=1`` (CUDA): ``torch.cuda.set_sync_debug_mode("warn")`` inside ``step`` phases of steps
  after the third, and ``after`` phases of steps that are not in ``LOOP_PROBE_SYNC_STEPS`` (comma-separated);
  every CUDA sync warning is recorded with its phase and location.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch  # noqa: E402

TORCH_DIR = str(Path(torch.__file__).resolve().parent)
HERE, WARNINGS = str(Path(__file__).resolve()), str(Path(warnings.__file__).resolve())
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")

state = {"phase": ["setup", 0], "reads": [], "syncs": [], "boundaries": [], "injected": []}


def _caller() -> str:
    """The innermost frame outside torch's Python code: ``path:line`` (repository paths relative to it)."""
    for frame in reversed(traceback.extract_stack()):
        path = str(Path(frame.filename).resolve())
        if path.startswith(TORCH_DIR) or path in (HERE, WARNINGS):
            continue
        if path.startswith(str(ROOT)) and "/.venv/" not in path:
            path = os.path.relpath(path, ROOT)
        return f"{path}:{frame.lineno}"
    return "?"


def _wrap_read(name: str) -> None:
    original = getattr(torch.Tensor, name)

    def read(self, *args, **kwargs):
        state["reads"].append({"phase": list(state["phase"]), "method": name, "where": _caller()})
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, name, read)


SYNC_DEBUG = os.environ.get("LOOP_PROBE_SYNC_DEBUG") == "1" and torch.cuda.is_available()
SIGTERM_AT = int(os.environ.get("LOOP_PROBE_SIGTERM_AT", "0"))
SYNC_STEPS = {int(s) for s in os.environ.get("LOOP_PROBE_SYNC_STEPS", "").split(",") if s}


def _set_phase(kind: str, step: int) -> None:
    state["phase"] = [kind, step]
    if SYNC_DEBUG:
        watched = step > 3 and (kind == "step" or step not in SYNC_STEPS)
        torch.cuda.set_sync_debug_mode("warn" if watched else "default")


def _instrument_engine() -> None:
    engine_class = deepspeed.DeepSpeedEngine
    forward, step = engine_class.forward, engine_class.step

    def forward_probe(self, *args, **kwargs):
        if state["phase"][0] != "step":
            _set_phase("step", self.global_steps + 1)
            if self.global_steps + 1 == SIGTERM_AT:
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    def step_probe(self, *args, **kwargs):
        before = self.global_steps
        out = step(self, *args, **kwargs)
        if self.global_steps != before:
            state["boundaries"].append(self.global_steps)
            _set_phase("after", self.global_steps)
        return out

    engine_class.forward, engine_class.step = forward_probe, step_probe


def _inject_nonfinite(spec: str) -> None:
    """Wrap the compute_loss that the run hands to the step loop (test-only fault injection). Done before the run's
    modules import ``train_loop`` by name, so they import the wrapper."""
    import swinv2.train.loop as loop

    at, on_rank, kind, *always = spec.split(":")
    first, _, last = at.partition("-")  # one step, or a range "a-b"
    first, last = int(first), int(last or first)
    real_loop = loop.train_loop

    def train_loop(engine, loader, compute_loss, **kwargs):
        rank = torch.distributed.get_rank()
        done = set()

        def poisoned(batch):
            loss = compute_loss(batch)
            step = engine.global_steps + 1
            if rank == int(on_rank) and first <= step <= last and (always or step not in done):
                done.add(step)
                state["injected"].append(step)
                return loss * float("nan") if kind == "nan" else loss + float("inf")
            return loss

        return real_loop(engine, loader, poisoned, **kwargs)

    loop.train_loop = train_loop


def _save(path: str) -> None:
    rank = os.environ.get("RANK", "0")
    Path(f"{path}.rank{rank}").write_text(json.dumps(state))


def main() -> None:
    record, script, *args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    for name in READS:
        _wrap_read(name)
    _instrument_engine()
    if os.environ.get("LOOP_PROBE_NONFINITE"):
        _inject_nonfinite(os.environ["LOOP_PROBE_NONFINITE"])
    if SYNC_DEBUG:
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return shown(message, category, filename, lineno, file, line)
            state["syncs"].append({"phase": list(state["phase"]), "message": str(message)[:200],
                                   "where": _caller()})
        warnings.showwarning = showwarning
        warnings.simplefilter("always")
    atexit.register(_save, record)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
