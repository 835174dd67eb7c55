"""benchmarks/gpu_check.py on the CPU: its runner (the parts of ``--quick`` within 420 s of limits, every part in
its own process group under its limit, summary.json after every part whatever the part did) and its measuring
functions on tiny models, so a GPU session spends its minutes measuring rather than finding a typo."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load("benchmarks/gpu_check.py")
gpu_probes = _load("benchmarks/gpu_probes.py")
engine_curves = _load("tests/helpers/engine_curves.py")

TINY = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=32, window_size=4, num_classes=10)
QUICK_PARTS = {"cuda_tests", "sdpa_backends", "model_speed", "planner", "launcher_eager", "launcher_compiled",
               "loader_workers", "precision", "block_memory"}


def test_quick_runs_the_first_gpu_hour_parts_within_seven_minutes():
    quick = gpu_check.selected(quick=True, cuda=True)
    assert {p.name for p, _ in quick} == QUICK_PARTS
    assert sum(limit for _, limit in quick) <= gpu_check.QUICK_BUDGET_S == 420
    full = gpu_check.selected(quick=False, cuda=True)
    assert {p.name for p, _ in full} == {p.name for p in gpu_check.PARTS} > QUICK_PARTS
    assert [p.name for p, _ in gpu_check.selected(quick=True, cuda=False)] == ["cuda_tests"]  # skips, says why
    assert set(gpu_check.part_functions(Path("."), quick=True)) == {p.name for p in gpu_check.PARTS}


PART = """
import json, os, subprocess, sys, time
from pathlib import Path
out, name, action = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
seen = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
print("started", name, flush=True)  # must reach the log before the part ends
if action == "hang":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (out / "grandchild.pid").write_text(str(child.pid))
    time.sleep(120)
if action == "fail":
    sys.exit(3)
(out / f"{name}.json").write_text(json.dumps({"result": {"parts_in_summary": sorted(seen)}}))
"""


def test_summary_after_every_part_whatever_each_part_does(tmp_path):
    """Stand-in parts (a ``python -c`` each: the real ones need a GPU, except ``cuda_tests``, which needs minutes
    here) that fail, hang with a child of their own, and succeed. Each later part reads summary.json as it starts,
    so it shows what the runner had written before it."""
    names = ["model_speed", "planner", "precision"]
    parts = [(next(p for p in gpu_check.PARTS if p.name == n), 3 if n == "planner" else 60) for n in names]
    actions = {"model_speed": "fail", "planner": "hang", "precision": "ok"}
    commands = {n: [sys.executable, "-c", PART, str(tmp_path), n, actions[n]] for n in names}
    summary = gpu_check.run_all(tmp_path, quick=True, cuda=True, parts=parts, commands=commands)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["model_speed"]["error"] == "exit status 3"
    assert summary["planner"]["error"] == "timed out after 3 s" and summary["planner"]["wall_s"] < 60
    assert summary["precision"]["result"]["parts_in_summary"] == sorted(
        ["torch", "python", "quick", "cuda_available", "device", "time_limits_s", "model_speed", "planner"])
    for n in names:  # streamed: the first line is in each log, the timed-out part's included
        assert (tmp_path / f"{n}.log").read_text().startswith(f"started {n}")
    assert _ends(int((tmp_path / "grandchild.pid").read_text()))  # the hanging part's own child went with it


def _ends(pid: int) -> bool:
    """Whether process ``pid`` is gone or a zombie within 30 s (SIGKILL is delivered asynchronously)."""
    for _ in range(300):
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_engine_curves_puts_each_rank_batch_where_the_engine_lives():
    """DeepSpeed's forward does not move inputs: the helper moves them to the engine's device (the meta device
    stands in for CUDA), float32 whatever the training dtype (SimMIM casts the encoder's copy)."""
    images, mask = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.ones(8, 4, 4, dtype=torch.long)
    got_images, got_mask = engine_curves.rank_batch(images, mask, rank=1, per_rank=4, device="meta")
    assert got_images.device.type == got_mask.device.type == "meta"
    assert got_images.dtype == torch.float32 and got_mask.dtype == torch.long
    assert got_images.shape == (4, 3, 16, 16) and got_mask.shape == (4, 4, 4)
    cpu_images, _ = engine_curves.rank_batch(images, mask, rank=1, per_rank=4, device="cpu")
    assert torch.equal(cpu_images, images[4:].float())  # rank 1's slice


COMPILE = """
import torch
def f(x):
    x = x * 2
    torch._dynamo.graph_break()
    return x + 1
g = torch.compile(f, backend="eager", dynamic=False)
g(torch.ones(2)); g(torch.ones(3))
"""


@pytest.mark.slow  # a fresh interpreter compiling (~30 s on 2 shared cores)
def test_compile_counts_read_what_torch_logs():
    """One graph break (logged once per compiled frame) and a recompilation for a new shape."""
    env = {**os.environ, "TORCH_LOGS": "graph_breaks,recompiles"}
    result = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = gpu_check.compile_log_counts(result.stdout + result.stderr)
    assert counts["graph_breaks"] >= 1 and counts["recompiles"] >= 1, result.stderr[-3000:]


def test_bf16_logits_part_runs_on_the_cpu():
    rows = gpu_probes.bf16_vs_fp32_logits("cpu", names=["swinv2_tiny_window8_256"], batch=2, **TINY)
    row = rows["swinv2_tiny_window8_256"]
    assert 0 < row["autocast_max_abs_diff"] < 0.1 * row["logit_max_abs"]  # bf16 rounds, but little
    assert 0.0 <= row["cast_top1_agreement"] <= 1.0


@pytest.mark.filterwarnings("ignore::UserWarning")  # CPU autocast in fp16 warns that it is slow
def test_sdpa_against_explicit_part_runs_on_the_cpu():
    rows = gpu_probes.sdpa_vs_explicit("cpu", "swinv2_tiny_window8_256", batch=2, repeats=1, dtypes=("fp32",),
                                       **TINY)
    fp32 = rows["fp32"]
    assert fp32["sdpa"]["loss"] == pytest.approx(fp32["explicit"]["loss"], rel=1e-5)
    assert fp32["max_relative_grad_diff"]["value"] < 1e-4  # the same function on the CPU
    assert torch.isfinite(torch.tensor(fp32["sdpa"]["median_step_s"]))


def test_sdpa_backend_per_call_site_on_the_cpu():
    """The CPU's dispatch, known: a bias that needs a gradient sends training to the math path, evaluation runs
    the fused CPU kernel; in fp32 both paths compute the same function."""
    rows = gpu_probes.sdpa_backends("cpu", windows=(3,), dim=16, heads=2, dtype=torch.float32)
    assert rows["N=9"]["train"] == ["math"] and rows["N=9"]["eval"] == ["cpu_flash"]
    assert rows["N=9"]["eval_max_abs_diff_to_explicit"] < 1e-5 * rows["N=9"]["output_max_abs"]


@pytest.mark.slow  # fake-tensor counting, ~10 s here
def test_block_memory_part_counts_on_the_cpu():
    """On the CPU only the planner's side: the block's saved bytes hold at least its input to the attention
    (the normalised map, 1 x 8 x 8 x 16 floats) and the largest saved tensor is one of them."""
    row = gpu_probes.block_memory("cpu", dim=16, heads=2, window=4, size=8, dtype=torch.float32)
    assert row["predicted_saved_bytes"] >= 8 * 8 * 16 * 4 and 0 < row["predicted_largest_bytes"]
    assert row["predicted_peak_bytes"] == row["predicted_saved_bytes"] + row["predicted_largest_bytes"]
    assert "measured_peak_bytes" not in row


@pytest.mark.slow  # two DeepSpeed engines in a subprocess
def test_precision_part_runs_on_the_cpu(tmp_path):
    row = gpu_check.precision_curves(tmp_path, steps=2, precisions=("fp32", "bf16"))  # the CPU refuses fp16
    runs = json.loads((tmp_path / "precision_curves.json").read_text())
    fp32, bf16 = runs["fp32"]["losses"], runs["bf16"]["losses"]
    assert runs["bf16"]["communication_dtype"] == "torch.float32"
    assert row["fp32_first_last"] == [fp32[0], fp32[-1]] and row["bf16"]["all_finite"]
    gaps = [abs(b - a) / a for a, b in zip(fp32, bf16, strict=True)]
    assert row["bf16"]["max_relative_gap"] == pytest.approx(max(gaps))
    assert 0 < row["bf16"]["max_relative_gap"] < 0.05  # bf16 rounds, little (the same data and initial weights)


# The SwinV2-B config shrunk to seconds on 2 CPU cores (a 4-stage width-16 encoder at 64 px, the demo's mask cells).
TINY_PRETRAIN = ["model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "model.img_size=64",
                 "model.window_size=4", "simmim.mask_patch_size=8", "simmim.norm_target_patch_size=15",
                 "data.num_workers=0", "data.samples_per_epoch=32"]


@pytest.mark.slow  # a launcher run (the compiled variant's counts: test_compile_counts_read_what_torch_logs)
def test_pretrain_launcher_part_runs_on_the_cpu(tmp_path):
    steps = 4
    rows = gpu_check.pretrain_launcher(tmp_path, steps=steps, batch=4, variants=((False, True),),
                                       overrides=TINY_PRETRAIN)
    assert set(rows) == {"compile_false_ckpt_true"}
    for name, row in rows.items():
        log = (tmp_path / f"pretrain_{name}.log").read_text()
        assert row["returncode"] == 0, log[-3000:]
        assert row["steps_logged"] == steps and row["steps_summarised"] == steps - 1
        # The medians are those of the run's own reports (steps 2..4) in its metrics.jsonl, read back independently
        # here (the console shows a short line of each report; the file has every field).
        reports = [json.loads(t) for t in (tmp_path / f"pretrain_{name}" / "metrics.jsonl").read_text().splitlines()]
        speeds = sorted(r["train/images_per_s"] for r in reports[1:])
        assert row["images_per_s"] == pytest.approx(speeds[len(speeds) // 2]) and row["images_per_s"] > 0
        assert row["peak_memory_mb"] == max(r["train/peak_memory_mb"] for r in reports)
        assert 0 < row["loss"] < 10 and row["first_step"]["lr"] >= 0
        assert row["first_step_extra_s"] == pytest.approx(
            reports[0]["train/step_time_s"] - row["step_time_s"], abs=0.01)
        assert not (tmp_path / f"pretrain_{name}" / "checkpoints").exists()  # checkpoint.at_end=false: none written
    assert rows["compile_false_ckpt_true"]["checkpoint_activations"] and not rows["compile_false_ckpt_true"]["compile"]
    assert "graph_breaks" not in rows["compile_false_ckpt_true"]


@pytest.mark.slow  # makes 200 photos and their shards, then times both loaders (~20 s here)
def test_loader_workers_part_measures_this_host_and_sizes_the_workers_from_a_launcher_part(tmp_path):
    # A launcher part's result as run_part_here writes it (a stand-in: the launcher parts need a GPU's speed).
    eager = {"compile_false_ckpt_false": {"images_per_s": 1234.5}}
    (tmp_path / "launcher_eager.json").write_text(json.dumps({"result": eager, "seconds": 40.0}))
    row = gpu_check.loader_workers(tmp_path, quick=True)
    measured = json.loads((tmp_path / "loader_speed.json").read_text())
    assert row["workers"] == 1 and row["ours_img_s"] == measured["ours_img_s"] > 0 and measured["baseline_img_s"] > 0
    assert row["workers_for_launcher_eager"] == math.ceil(1234.5 / measured["ours_img_s"])
    assert "workers_for_launcher_compiled" not in row  # that part did not run
