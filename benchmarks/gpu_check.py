"""Everything this project can only learn on a GPU, in one command that writes one folder (about 10 min on one GPU):

    python benchmarks/gpu_check.py --out gpu_check            # then read gpu_check/summary.json

1. ``pytest -m cuda tests``: every CUDA test (tests/test_cuda*.py), JUnit XML and log.
2. bf16 against fp32 logits: SwinV2-B/192 and Swin-B/224 (random weights) in fp32, under bf16 autocast and
   cast to bf16: largest logit difference and top-1 agreement.
3. SDPA against explicit attention on CUDA, per precision (fp32, bf16, fp16): a SwinV2-T/256 training step's
   loss, the largest relative gradient difference, the peak allocated memory and the median step time.
4. ``benchmarks/model_speed.py`` in bf16 against timm (SwinV2-B/192, batch 64), with its per-attention-path rows.
5. ``benchmarks/plan_gpu_check.py``: the planner's predicted memory and step time against SimMIM SwinV2-B and -L
   training steps (``torch.cuda.max_memory_allocated``), to replace its stated allowance and MFU with measured ones.
6. The real launcher, ``launch/pretrain.py`` with ``configs/simmim/swinv2_base_192.yaml`` (SwinV2-B 192/w12, bf16) on
   the built-in demo data, ZeRO-2, one GPU, a few dozen steps, with and without ``run.compile`` and
   ``model.checkpoint_activations``: images/s and the other numbers of its step lines (TFLOP/s and MFU when the loop
   logs them), peak memory, and the wall time of each run (compilation included).

Each part runs in its own try (and the subprocesses under a time limit), so one failure still leaves the others'
results. Without a GPU it writes what it can (the skipped pytest run) and says that the rest needs one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BF16_MODELS = ("swinv2_base_window12_192", "swin_base_patch4_window7_224")


def run_cuda_tests(out: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs", "tests", f"--junitxml={out / 'cuda_tests.xml'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    (out / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    return {"returncode": proc.returncode, "last_line": (proc.stdout.strip().splitlines() or [""])[-1]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_vs_fp32_logits(device: str = "cuda", names=BF16_MODELS, batch: int = 16, **overrides) -> dict:
    """Logits in fp32, under bf16 autocast and with the model cast to bf16."""
    import swinv2

    results = {}
    for name in names:
        torch.manual_seed(0)
        model = swinv2.create_model(name, **{"num_classes": 1000, **overrides}).to(device).eval()
        x = torch.randn(batch, 3, *model.img_size, device=device)
        with torch.no_grad():
            fp32 = model(x).double()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                autocast = model(x).double()
            cast = model.bfloat16()(x.bfloat16()).double()
        results[name] = {
            "logit_max_abs": float(fp32.abs().max()),
            "autocast_max_abs_diff": float((autocast - fp32).abs().max()),
            "cast_max_abs_diff": float((cast - fp32).abs().max()),
            "autocast_top1_agreement": float((autocast.argmax(1) == fp32.argmax(1)).float().mean()),
            "cast_top1_agreement": float((cast.argmax(1) == fp32.argmax(1)).float().mean()),
        }
    return results


def _train_step(model, x: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    return loss


def sdpa_vs_explicit(device: str = "cuda", name: str = "swinv2_tiny_window8_256", batch: int = 32, repeats: int = 5,
                     dtypes=("fp32", "bf16", "fp16"), **overrides) -> dict:
    """One training step per attention path and precision: loss, gradient difference, peak memory, time."""
    import swinv2
    from swinv2.attention import WindowAttention

    device = torch.device(device)
    results = {}
    for dtype_name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        torch.manual_seed(0)
        model = swinv2.create_model(name, **{"num_classes": 1000, **overrides}).to(device).train()
        x = torch.randn(batch, 3, *model.img_size, device=device)
        target = torch.randint(0, model.num_classes, (batch,), device=device)
        row, grads = {}, {}
        for path in ("sdpa", "explicit"):
            for m in model.modules():
                if isinstance(m, WindowAttention):
                    m.fused, m.cpu_kernels = path == "sdpa", False
            model.zero_grad(set_to_none=True)
            _train_step(model, x, target, dtype)  # warm-up
            model.zero_grad(set_to_none=True)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            loss = _train_step(model, x, target, dtype)
            _sync(device)
            row[path] = {"loss": float(loss)}
            if device.type == "cuda":
                row[path]["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            grads[path] = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
            times = []
            for _ in range(repeats):
                model.zero_grad(set_to_none=True)
                _sync(device)
                start = time.perf_counter()
                _train_step(model, x, target, dtype)
                _sync(device)
                times.append(time.perf_counter() - start)
            row[path]["median_step_s"] = round(sorted(times)[len(times) // 2], 4)
        rel = {n: float((grads["sdpa"][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
               for n, g in grads["explicit"].items()}
        worst = max(rel, key=rel.get)
        row["max_relative_grad_diff"] = {"param": worst, "value": rel[worst]}
        results[dtype_name] = row
    return results


def model_speed(out: Path) -> dict:
    cmd = [sys.executable, "benchmarks/model_speed.py", "--model", "swinv2_base_window12_192", "--batch", "64",
           "--dtype", "bf16", "--repeats", "10", "--json", str(out / "model_speed_bf16.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    (out / "model_speed_bf16.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        return {"returncode": proc.returncode}
    return json.loads((out / "model_speed_bf16.json").read_text())


def planner(out: Path) -> list:
    cmd = [sys.executable, "benchmarks/plan_gpu_check.py", "--out", str(out / "plan_gpu_check.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    (out / "plan_gpu_check.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        return [{"returncode": proc.returncode}]
    return json.loads((out / "plan_gpu_check.json").read_text())


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


def pretrain_launcher(out: Path, steps: int = 30, batch: int = 128, variants=PRETRAIN_VARIANTS, overrides=(),
                      timeout: float = 420) -> dict:
    """``launch/pretrain.py`` as a user runs it: the SwinV2-B 192/w12 config in bf16 with ZeRO-2 on one process
    (GPU 0, or the CPU), the demo data, ``steps`` steps of ``batch`` images, once per (compile, checkpoint
    activations) variant; ``overrides`` shrink it for the CPU. Each run's console is kept as
    ``out/pretrain_<name>.log``."""
    rows = {}
    for compiled, checkpointing in variants:
        name = f"compile_{str(compiled).lower()}_ckpt_{str(checkpointing).lower()}"
        run_dir = out / f"pretrain_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "launch/pretrain.py", "--config", "configs/simmim/swinv2_base_192.yaml",
               "data.train_urls=demo:train", "data.num_workers=6", f"data.batch_size={batch}",
               f"deepspeed.global_batch={batch}", "deepspeed.zero_stage=2", "deepspeed.precision=bf16",
               f"run.compile={str(compiled).lower()}", f"model.checkpoint_activations={str(checkpointing).lower()}",
               f"run.max_steps={steps}", "run.log_every=1", "run.image_every=0", "checkpoint.every_steps=1000000",
               "wandb.mode=disabled", f"run.output_dir={run_dir}", *overrides]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            rows[name] = {"error": f"timed out after {timeout} s", "wall_s": round(time.perf_counter() - start, 1)}
            (out / f"pretrain_{name}.log").write_text(str(error.stdout or "") + str(error.stderr or ""))
            continue
        wall = round(time.perf_counter() - start, 1)
        (out / f"pretrain_{name}.log").write_text(proc.stdout + proc.stderr)
        logged = reported_metrics(run_dir)
        row = {"returncode": proc.returncode, "wall_s": wall, "compile": compiled,
               "checkpoint_activations": checkpointing}
        if logged:
            row.update(summarise_steps(logged, skip=min(5, max(1, len(logged) // 4))))
            row["first_step"] = logged[min(logged)]
        if proc.returncode:
            row["stderr_tail"] = proc.stderr[-2000:]
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a SwinV2-B ZeRO checkpoint is ~1.5 GB
        rows[name] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check", help="folder for every result (created)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # DeepSpeed JIT-builds ops with the first ninja on PATH: the environment's own (see tests/conftest.py).
    os.environ["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))

    summary: dict = {"torch": torch.__version__, "python": platform.python_version(),
                     "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        summary["device"] = torch.cuda.get_device_name()
    parts = [("cuda_tests", lambda: run_cuda_tests(out))]
    if torch.cuda.is_available():
        parts += [("bf16_vs_fp32_logits", bf16_vs_fp32_logits), ("sdpa_vs_explicit", sdpa_vs_explicit),
                  ("model_speed_bf16", lambda: model_speed(out)), ("planner", lambda: planner(out)),
                  ("pretrain_launcher", lambda: pretrain_launcher(out))]
    else:
        summary["note"] = "no CUDA GPU here: the CUDA tests were skipped and parts 2-6 need a GPU"
    for name, part in parts:
        start = time.perf_counter()
        try:
            summary[name] = part()
        except Exception as error:  # keep the other parts' results; the traceback goes into the summary
            summary[name] = {"error": repr(error), "traceback": traceback.format_exc()}
        summary[name + "_s"] = round(time.perf_counter() - start, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"{name}: done in {summary[name + '_s']} s", flush=True)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
