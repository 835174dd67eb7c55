"""benchmarks/gpu_check.py's measuring parts run on the CPU too (tiny models), so a GPU session spends its
minutes measuring rather than finding a typo; their numbers are checked where the CPU can check them."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

LOADER = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parent.parent / "benchmarks/gpu_check.py")
gpu_check = importlib.util.module_from_spec(LOADER)
LOADER.loader.exec_module(gpu_check)

TINY = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=32, window_size=4, num_classes=10)


def test_bf16_logits_part_runs_on_the_cpu():
    rows = gpu_check.bf16_vs_fp32_logits("cpu", names=["swinv2_tiny_window8_256"], batch=2, **TINY)
    row = rows["swinv2_tiny_window8_256"]
    assert 0 < row["autocast_max_abs_diff"] < 0.1 * row["logit_max_abs"]  # bf16 rounds, but little
    assert 0.0 <= row["cast_top1_agreement"] <= 1.0


@pytest.mark.filterwarnings("ignore::UserWarning")  # CPU autocast in fp16 warns that it is slow
def test_sdpa_against_explicit_part_runs_on_the_cpu():
    rows = gpu_check.sdpa_vs_explicit("cpu", "swinv2_tiny_window8_256", batch=2, repeats=1, dtypes=("fp32",),
                                      **TINY)
    fp32 = rows["fp32"]
    assert fp32["sdpa"]["loss"] == pytest.approx(fp32["explicit"]["loss"], rel=1e-5)
    assert fp32["max_relative_grad_diff"]["value"] < 1e-4  # the same function on the CPU
    assert torch.isfinite(torch.tensor(fp32["sdpa"]["median_step_s"]))


# The SwinV2-B config shrunk to seconds on 2 CPU cores (a 4-stage width-16 encoder at 64 px, the demo's mask cells).
TINY_PRETRAIN = ["model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "model.img_size=64",
                 "model.window_size=4", "simmim.mask_patch_size=8", "simmim.norm_target_patch_size=15",
                 "data.num_workers=0", "data.samples_per_epoch=32"]


@pytest.mark.slow  # one of the two runs compiles (inductor, ~10 s on the CPU)
def test_pretrain_launcher_part_runs_on_the_cpu(tmp_path):
    steps = 4
    rows = gpu_check.pretrain_launcher(tmp_path, steps=steps, batch=4, variants=((False, True), (True, False)),
                                       overrides=TINY_PRETRAIN)
    assert set(rows) == {"compile_false_ckpt_true", "compile_true_ckpt_false"}
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
        assert not (tmp_path / f"pretrain_{name}" / "checkpoints").exists()  # the part removes its checkpoints
    assert rows["compile_true_ckpt_false"]["compile"] and rows["compile_false_ckpt_true"]["checkpoint_activations"]
