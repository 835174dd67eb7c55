"""Everything this project can only learn on a GPU, in one command that writes one folder:

    python benchmarks/gpu_check.py --quick --out gpu_check    # the first command on a GPU: <= 7 min on one H100
    python benchmarks/gpu_check.py --out gpu_check            # every part, longer runs (about 40 min)

Every part runs in its own process under its own time limit (``--quick``'s add up to 420 s), its console streamed
to ``out/<part>.log`` as it runs, its result in ``out/<part>.json``; ``summary.json`` is rewritten after every
part. A part that fails, hangs or kills its process leaves the others' results and the log of where it stopped.
``TORCHINDUCTOR_CACHE_DIR`` is ``out/inductor_cache``, so a second run reuses the compiled kernels.

Parts (``q``: also under ``--quick``):

- ``cuda_tests`` (q): ``pytest -x --durations=15`` on the ``cuda`` tests (tests/test_cuda*.py; ``--quick``: those not
  marked ``slow``), JUnit XML beside the log.
- ``sdpa_backends`` (q): which SDPA kernel runs at each call site (training with gradients, ``no_grad``
  evaluation) per window length N in {36, 49, 64, 144, 196, 576}, bf16 weights as the launcher runs them, and the
  evaluation output's distance to the explicit path.
- ``model_speed`` (q): ``benchmarks/model_speed.py`` in bf16 against timm (SwinV2-B/192, batch 64).
- ``planner`` (q): ``benchmarks/plan_gpu_check.py``, the planner's memory and time against real DeepSpeed steps
  (``--quick``: SwinV2-B without activation checkpointing only).
- ``launcher_eager``, ``launcher_compiled`` (q): ``launch/pretrain.py`` as a user runs it (SwinV2-B 192/w12, bf16,
  ZeRO-2, the demo data, 20 steps; 30 without ``--quick``), with ``run.compile`` off and on: images/s, peak memory,
  every number of its step lines, the first step's time; compiled, also the graph breaks and recompilations torch
  logs (``TORCH_LOGS=graph_breaks,recompiles``). No checkpoint is written (``checkpoint.at_end=false``).
- ``loader_workers`` (q): ``benchmarks/loader_speed.py`` with one worker on this host (images/s per worker, against
  ImageFolder) and, from it, the workers per GPU that the launcher parts' measured images/s need (the planner's
  advice assumes 500 images/s per worker; this is the host's own figure).
- ``precision`` (q): 200 steps of the tiny demo SimMIM through our DeepSpeed engine (tests/helpers/engine_curves.py)
  in fp32, in pure bf16 (DeepSpeed's bf16: bf16 weights, no autocast, the launcher's regime) and in fp16: the loss
  curves and their largest relative gap.
- ``block_memory`` (q): one SwinV2-G stage-1 block (1536 px, window 32, batch 1, no activation checkpointing):
  measured peak memory of its forward + backward against the planner's count.
- ``launcher_checkpointing``: the launcher with activation checkpointing, eager and compiled.
- ``bf16_vs_fp32_logits``, ``sdpa_vs_explicit``: see ``benchmarks/gpu_probes.py``.

Without a GPU only ``cuda_tests`` runs (every test skipped, saying why); the summary says the rest needs one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_probes  # noqa: E402

QUICK_BUDGET_S = 420  # 7 minutes of parts: what a first session on one H100 can spend


@dataclass(frozen=True)
class Part:
    """One measurement: its time limit with and without ``--quick`` (``quick_s=None``: not part of ``--quick``)."""

    name: str
    quick_s: int | None
    full_s: int
    needs_cuda: bool = True


PARTS = (
    Part("cuda_tests", 100, 1500, needs_cuda=False),
    Part("sdpa_backends", 25, 60),
    Part("model_speed", 30, 300),
    Part("planner", 45, 300),
    Part("launcher_eager", 40, 420),
    Part("launcher_compiled", 95, 600),
    Part("loader_workers", 20, 120),
    Part("precision", 40, 120),
    Part("block_memory", 25, 60),
    Part("launcher_checkpointing", None, 900),
    Part("bf16_vs_fp32_logits", None, 120),
    Part("sdpa_vs_explicit", None, 300),
)


def selected(quick: bool, cuda: bool) -> list[tuple[Part, int]]:
    """The parts to run and the time limit of each."""
    return [(p, p.quick_s if quick else p.full_s) for p in PARTS
            if (cuda or not p.needs_cuda) and (p.quick_s is not None or not quick)]


def run_cuda_tests(out: Path, quick: bool) -> dict:
    marker = "cuda and not slow" if quick else "cuda"
    cmd = [sys.executable, "-m", "pytest", "-x", "--durations=15", "-q", "-rs", "-m", marker, "tests",
           f"--junitxml={out / 'cuda_tests.xml'}"]
    return {"returncode": subprocess.run(cmd, cwd=ROOT).returncode, "marker": marker}  # console: the part's log


def model_speed(out: Path, quick: bool) -> dict:
    result = out / "model_speed_bf16.json"
    cmd = [sys.executable, "benchmarks/model_speed.py", "--model", "swinv2_base_window12_192", "--batch", "64",
           "--dtype", "bf16", "--repeats", "3" if quick else "10", "--json", str(result)]
    code = subprocess.run(cmd, cwd=ROOT).returncode
    return json.loads(result.read_text()) if code == 0 else {"returncode": code}


def planner(out: Path, quick: bool) -> dict:
    result = out / "plan_gpu_check.json"
    cmd = [sys.executable, "benchmarks/plan_gpu_check.py", "--out", str(result), *(["--quick"] if quick else [])]
    code = subprocess.run(cmd, cwd=ROOT).returncode
    return {"rows": json.loads(result.read_text())} if code == 0 else {"returncode": code}


def precision_curves(out: Path, steps: int = 200, precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")) -> dict:
    """Loss curves of the same tiny SimMIM and data through our DeepSpeed engine in fp32 and each other precision
    (DeepSpeed's CPU accelerator refuses fp16), with each one's relative gap to fp32."""
    result = out / "precision_curves.json"
    cmd = [sys.executable, "tests/helpers/engine_curves.py", "--out", str(result), "--steps", str(steps)]
    for precision in precisions:
        cmd += ["--run", precision, f"deepspeed.precision={precision}", "deepspeed.zero_stage=1"]
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code:
        return {"returncode": code}
    runs = json.loads(result.read_text())
    fp32 = runs["fp32"]["losses"]
    row: dict = {"steps": steps, "fp32_first_last": [fp32[0], fp32[-1]]}
    for name in precisions[1:]:
        losses = runs[name]["losses"]
        gaps = [abs(a - b) / abs(b) for a, b in zip(losses, fp32, strict=True)]
        row[name] = {"max_relative_gap": max(gaps), "last_relative_gap": gaps[-1],
                     "first_last": [losses[0], losses[-1]], "all_finite": all(map(math.isfinite, losses))}
    return row


def loader_workers(out: Path, quick: bool) -> dict:
    """The host's loader rate per worker and the workers each launcher part's measured speed needs from it."""
    result = out / "loader_speed.json"
    cmd = [sys.executable, "benchmarks/loader_speed.py", "--images", "200" if quick else "800", "--workers", "1",
           "--repeats", "2" if quick else "3", "--json", str(result)]
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code:
        return {"returncode": code}
    row = json.loads(result.read_text())
    per_worker = row["ours_img_s"]
    for part in ("launcher_eager", "launcher_compiled"):
        done = out / f"{part}.json"
        speeds = [r["images_per_s"] for r in json.loads(done.read_text())["result"].values()
                  if "images_per_s" in r] if done.exists() else []
        if speeds:
            row[f"workers_for_{part}"] = math.ceil(max(speeds) / per_worker)
    return row


PRETRAIN_VARIANTS = ((False, False), (True, False), (False, True), (True, True))  # (compile, checkpoint activations)


def reported_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """``{step: {key: number}}`` from the run's ``metrics.jsonl`` (every field of every report; the console shows
    only a short line), keys without their ``train/`` prefix."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["step"]: {k.removeprefix("train/"): v for k, v in row.items() if k != "step"} for row in rows}


def summarise_steps(steps: dict[int, dict[str, float]], skip: int) -> dict:
    """Medians of every logged number over the steps after the first ``skip`` (compilation and warm-up), and the
    largest ``peak_memory_mb``."""
    later = [steps[s] for s in sorted(steps) if s > skip] or [steps[s] for s in sorted(steps)]
    keys = sorted({k for row in later for k in row})
    out = {k: statistics.median(row[k] for row in later if k in row) for k in keys}
    if any("peak_memory_mb" in row for row in steps.values()):
        out["peak_memory_mb"] = max(row.get("peak_memory_mb", 0.0) for row in steps.values())
    out["steps_logged"], out["steps_summarised"] = len(steps), len(later)
    return out


def compile_log_counts(log: str) -> dict[str, int]:
    """Graph breaks and recompilations in a console run with ``TORCH_LOGS=graph_breaks,recompiles`` (the phrases
    torch._dynamo logs for each)."""
    return {"graph_breaks": log.count("Graph break in user code"), "recompiles": log.count("Recompiling function")}


def launcher_command(run_dir: Path, steps: int, batch: int, compiled: bool, checkpointing: bool,
                     overrides=()) -> list[str]:
    return [sys.executable, "launch/pretrain.py", "--config", "configs/simmim/swinv2_base_192.yaml",
            "data.train_urls=demo:train", "data.num_workers=6", f"data.batch_size={batch}",
            f"deepspeed.global_batch={batch}", "deepspeed.zero_stage=2", "deepspeed.precision=bf16",
            f"run.compile={str(compiled).lower()}", f"model.checkpoint_activations={str(checkpointing).lower()}",
            f"run.max_steps={steps}", "run.log_every=1", "run.image_every=0", "checkpoint.every_steps=1000000",
            "checkpoint.at_end=false",
            "wandb.mode=disabled", f"run.output_dir={run_dir}", *overrides]


def launcher_row(run_dir: Path, log: str, returncode: int, wall: float, compiled: bool, checkpointing: bool) -> dict:
    """One launcher run's numbers: its step reports summarised, its first step, compile statistics."""
    row = {"returncode": returncode, "wall_s": wall, "compile": compiled, "checkpoint_activations": checkpointing}
    logged = reported_metrics(run_dir)
    if logged:
        row.update(summarise_steps(logged, skip=min(5, max(1, len(logged) // 4))))
        row["first_step"] = logged[min(logged)]
        if "step_time_s" in row:  # the first step's extra time: compilation (and warm-up)
            row["first_step_extra_s"] = round(row["first_step"].get("step_time_s", 0.0) - row["step_time_s"], 2)
    if compiled:
        row.update(compile_log_counts(log))
    if returncode:
        row["log_tail"] = log[-2000:]
    return row


def pretrain_launcher(out: Path, steps: int = 30, batch: int = 128, variants=PRETRAIN_VARIANTS, overrides=(),
                      timeout: float = 600) -> dict:
    """``launch/pretrain.py`` as a user runs it: the SwinV2-B 192/w12 config in bf16 with ZeRO-2 on one process
    (GPU 0, or the CPU), the demo data, ``steps`` steps of ``batch`` images, once per (compile, checkpoint
    activations) variant; ``overrides`` shrink it for the CPU. Each run's console streams to
    ``out/pretrain_<name>.log``; it writes no checkpoint (a SwinV2-B ZeRO checkpoint is ~1.5 GB)."""
    rows = {}
    for compiled, checkpointing in variants:
        name = f"compile_{str(compiled).lower()}_ckpt_{str(checkpointing).lower()}"
        run_dir, log_path = out / f"pretrain_{name}", out / f"pretrain_{name}.log"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = launcher_command(run_dir, steps, batch, compiled, checkpointing, overrides)
        env = {**os.environ, **({"TORCH_LOGS": "graph_breaks,recompiles"} if compiled else {})}
        start = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = -signal.SIGKILL
        wall = round(time.perf_counter() - start, 1)
        rows[name] = launcher_row(run_dir, log_path.read_text(errors="replace"), code, wall, compiled, checkpointing)
        if code == -signal.SIGKILL:
            rows[name]["error"] = f"timed out after {timeout} s"
    return rows


def part_functions(out: Path, quick: bool) -> dict[str, Callable[[], dict]]:
    """What each part runs (inside its own process)."""
    steps = 20 if quick else 30
    return {
        "cuda_tests": lambda: run_cuda_tests(out, quick),
        "sdpa_backends": lambda: gpu_probes.sdpa_backends("cuda"),
        "model_speed": lambda: model_speed(out, quick),
        "planner": lambda: planner(out, quick),
        "launcher_eager": lambda: pretrain_launcher(out, steps, variants=((False, False),)),
        "launcher_compiled": lambda: pretrain_launcher(out, steps, variants=((True, False),)),
        "loader_workers": lambda: loader_workers(out, quick),
        "precision": lambda: precision_curves(out),
        "block_memory": lambda: gpu_probes.block_memory("cuda"),
        "launcher_checkpointing": lambda: pretrain_launcher(out, steps, variants=((False, True), (True, True))),
        "bf16_vs_fp32_logits": lambda: gpu_probes.bf16_vs_fp32_logits("cuda"),
        "sdpa_vs_explicit": lambda: gpu_probes.sdpa_vs_explicit("cuda"),
    }


def run_part_here(name: str, out: Path, quick: bool) -> int:
    """The child side: run part ``name`` and write ``out/<name>.json``."""
    start = time.perf_counter()
    result = part_functions(out, quick)[name]()
    (out / f"{name}.json").write_text(json.dumps({"result": result, "seconds": round(time.perf_counter() - start, 1)},
                                                 indent=1))
    return 0


def run_part(name: str, limit: int, out: Path, quick: bool, command: list[str] | None = None) -> dict:
    """Run one part in its own process group under ``limit`` seconds, console streamed to ``out/<name>.log``;
    return its result, or why there is none (exit status, timeout) with the log's tail. ``command`` replaces
    the part's own (tests use it)."""
    (out / f"{name}.json").unlink(missing_ok=True)
    log_path = out / f"{name}.log"
    cmd = command or [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--run-part", name,
                      *(["--quick"] if quick else [])]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and everything it started
            proc.wait()
            code = None
    row: dict = {"limit_s": limit, "wall_s": round(time.perf_counter() - start, 1)}
    result = out / f"{name}.json"
    if code == 0 and result.exists():
        row.update(json.loads(result.read_text()))
    else:
        row["error"] = f"timed out after {limit} s" if code is None else f"exit status {code}"
        row["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    return row


def gpu_name() -> str | None:
    """The GPU's name from ``nvidia-smi`` (the parent never creates a CUDA context: it would hold memory that the
    parts measure)."""
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() or None


def child_env(out: Path) -> None:
    """What every part inherits: the repository importable, unbuffered consoles (the logs stream), the
    environment's own ninja first on PATH (DeepSpeed JIT-builds ops with the first one; see tests/conftest.py)
    and a persistent inductor cache in the output folder."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(out / "inductor_cache"))


def run_all(out: Path, quick: bool, cuda: bool, parts: list[tuple[Part, int]] | None = None,
            commands: dict[str, list[str]] | None = None) -> dict:
    """Run the parts in turn, rewriting ``out/summary.json`` after each; ``commands`` replaces some parts' own
    commands (tests/test_gpu_check.py, for a part that needs a GPU)."""
    summary: dict = {"torch": torch.__version__, "python": platform.python_version(), "quick": quick,
                     "cuda_available": cuda, "device": gpu_name() if cuda else None}
    parts = selected(quick, cuda) if parts is None else parts
    summary["time_limits_s"] = {p.name: limit for p, limit in parts}
    if not cuda:
        summary["note"] = "no CUDA GPU here: the CUDA tests were skipped and the other parts need a GPU"
    for part, limit in parts:
        summary[part.name] = run_part(part.name, limit, out, quick, (commands or {}).get(part.name))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"{part.name}: {summary[part.name].get('error', 'done')} in {summary[part.name]['wall_s']} s",
              flush=True)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check", help="folder for every result (created)")
    parser.add_argument("--quick", action="store_true", help=f"the short parts, {QUICK_BUDGET_S} s of limits in all")
    parser.add_argument("--run-part", choices=[p.name for p in PARTS], help=argparse.SUPPRESS)  # the child side
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.run_part:
        return run_part_here(args.run_part, out, args.quick)
    child_env(out)
    summary = run_all(out, args.quick, torch.cuda.is_available())
    print(f"summary: {out / 'summary.json'}")
    return 0 if all("error" not in summary[p.name] for p, _ in selected(args.quick, summary["cuda_available"])) else 1


if __name__ == "__main__":
    sys.exit(main())
