"""TFLOP/s, MFU and the step time split in wandb and ``metrics.jsonl``, the short console line; the profiler trace of
``run.profile_steps``; the peak table and the measured CPU peak (:mod:`swinv2.train.throughput`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pretrain_helpers import ROOT, TINY, describe, pretrain_cmd, run, wandb_history
from torch.utils.flop_counter import FlopCounterMode

from simmim.config import PretrainConfig
from simmim.masking import MaskGenerator
from simmim.pretrain import build_simmim
from swinv2.train.config import load_config
from swinv2.train.console import WIDTH
from swinv2.train.throughput import PhaseTimer, device_peak, step_flops, table_peak_tflops

SPLIT = ("train/time_data_s", "train/time_fwd_bwd_s", "train/time_optimizer_s", "train/time_checkpoint_s")
# What every report holds besides the split (the console shows the first few and the non-zero counters).
ALL_FIELDS = ("loss", "lr", "grad_norm", "images_per_s", "tflops", "mfu_pct", "step_time_s", "peak_memory_mb", "epoch",
              "skipped_samples", "skipped_steps", "nonfinite_steps", "nonfinite_skipped", "rollbacks", "eta_min",
              "updates")
PEAK = 0.05  # TFLOP/s, given as run.peak_tflops


@pytest.mark.slow
def test_reports_show_tflops_mfu_and_time_split_and_the_profiler_traces_its_steps(tmp_path):
    # Also the report's three outlets: every field to wandb and metrics.jsonl, a short line of them to the console.
    out = tmp_path / "run"
    result = run(pretrain_cmd(out, "run.max_steps=4", "run.log_every=2", "checkpoint.every_steps=2",
                              "wandb.mode=offline", "run.profile_steps=[2,3]", f"run.peak_tflops={PEAK}"))
    assert result.returncode == 0, describe(result)
    assert f"MFU peak: {PEAK:.4g} TFLOP/s per device (run.peak_tflops)" in result.stdout

    # The reference: 3 x the forward FLOPs of one micro batch of the run's model, counted here on real tensors
    # (the run counts on fake ones), times micro batches per step (8 images, one micro batch per step). The
    # attention runs its explicit reference path, whose q k^T and attn v are plain bmm: FlopCounterMode has no
    # formula for the CPU's fused attention kernel and would leave them out.
    cfg = load_config(PretrainConfig, ROOT / "configs" / "demo.yaml", list(TINY))
    model = build_simmim(cfg)
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = False
    size, batch = cfg.model.img_size, cfg.data.batch_size
    masks = MaskGenerator(size, cfg.simmim.mask_patch_size, model.patch_size, cfg.simmim.mask_ratio)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(batch, 3, size, size), torch.stack([masks(seed=i) for i in range(batch)]))
    flops_per_step = 3 * counter.get_total_flops() * (cfg.deepspeed.global_batch // batch)

    history = wandb_history(next((out / "wandb").glob("offline-run-*/run-*.wandb")))
    for step in (2, 4):
        row = history[step]
        seconds = row["train/step_time_s"]
        assert row["train/tflops"] * 1e12 * seconds == pytest.approx(flops_per_step, rel=1e-9)
        assert row["train/mfu_pct"] == pytest.approx(100 * row["train/tflops"] / PEAK, rel=1e-9)
        split = [row[key] for key in SPLIT]
        assert all(s >= 0 for s in split) and row["train/time_fwd_bwd_s"] > 0, row
        assert sum(split) <= seconds  # disjoint parts of the steps' wall time
        line = next(t for t in result.stdout.splitlines() if t.startswith(f"step {step}/"))
        assert f" mfu {row['train/mfu_pct']:.3g}% " in line and "tflops" not in line, line  # the short set only

    # metrics.jsonl: one object per report (steps 2 and 4), every field, the same values as wandb's.
    reports = [json.loads(t) for t in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports] == [2, 4]
    for report in reports:
        row = history[report["step"]]
        fields = {k: v for k, v in report.items() if k != "step"}
        assert set(fields) == {f"train/{k}" for k in ALL_FIELDS} | set(SPLIT), fields
        assert fields == {k: row[k] for k in fields}, (fields, row)
    # Every console line of a report is short; its counters are left out while they are 0.
    shown = [t for t in result.stdout.splitlines() if t.startswith("step ")]
    assert len(shown) == 2 and all(len(t) <= WIDTH for t in shown), shown
    assert all(t.split()[2:12:2] == ["loss", "lr", "grad", "img/s", "mfu"] and "skipped" not in t for t in shown)
    # Step 2's checkpoint is written after its report, so the report of step 4 holds it (and step 2's none).
    assert history[2]["train/time_checkpoint_s"] == 0 and history[4]["train/time_checkpoint_s"] > 0

    trace = json.loads((out / "profile" / "trace_steps2-3_rank0.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("train_step_")}
    assert steps == {"train_step_2", "train_step_3"}
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])  # the ops inside them


@pytest.mark.parametrize("name, precision, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.5),  # SXM: 1,979 with sparsity
    ("NVIDIA H100 PCIe", "bf16", False, 756.5),
    ("NVIDIA H100 NVL", "fp16", False, 835.5),
    ("NVIDIA H200", "bf16", False, 989.5),
    ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0),
    ("NVIDIA A100-PCIE-40GB", "fp32", False, 19.5),
    ("NVIDIA L40S", "bf16", False, 362.05),
    ("NVIDIA L40", "bf16", False, 181.05),
    ("NVIDIA A10G", "bf16", False, 125.0),
    ("Tesla V100-SXM2-16GB", "fp16", False, 125.0),
    ("Tesla V100-PCIE-32GB", "fp16", False, 112.0),
    ("Tesla V100-SXM2-16GB", "bf16", False, None),  # no bf16 on Volta: measured instead
    ("Some Future GPU", "bf16", False, None),
])
def test_gpu_peaks_follow_the_datasheets(name, precision, tf32, peak):
    assert table_peak_tflops(name, precision, tf32) == peak


def test_cpu_peak_is_measured_and_the_config_overrides_it():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    measured = device_peak(torch.device("cpu"), "fp32")
    assert torch.equal(torch.rand(4), expected)  # measuring draws nothing from the run's random stream
    assert measured.source.startswith("measured") and 0 < measured.tflops < 1e3
    assert device_peak(torch.device("cpu"), "fp32", override=1.5).tflops == 1.5


def test_step_flops_count_forward_and_backward_of_every_micro_batch():
    from swinv2.flops import ImageFlops

    flops = ImageFlops(per_image=10, fixed=3, block_per_image=0, block_fixed=0)
    assert step_flops(flops, micro_batch=4, accumulation=2) == 3 * (10 * 4 + 3) * 2  # the fixed part per forward


def test_phase_timer_on_the_cpu_adds_host_time_and_starts_over_when_read():
    timer = PhaseTimer(torch.device("cpu"))
    started = timer.start()
    torch.randn(256, 256) @ torch.randn(256, 256)
    timer.stop("fwd_bwd", started)
    timer.add("data", 0.25)
    first = timer.read()
    assert first["data"] == 0.25 and first["fwd_bwd"] > 0 and first["optimizer"] == 0
    assert timer.read() == dict.fromkeys(first, 0.0)
    assert math.isfinite(first["fwd_bwd"])
