"""benchmarks/gpu_check.py's measuring parts run on the CPU too (tiny models), so a GPU session spends its
minutes measuring rather than finding a typo; their numbers are checked where the CPU can check them."""

import importlib.util
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
