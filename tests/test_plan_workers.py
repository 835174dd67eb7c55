"""The planner's DataLoader-workers line, against a hand derivation."""

from __future__ import annotations

import pytest

from swinv2.plan.gpus import GPUS
from swinv2.plan.planner import Cluster, Plan
from swinv2.plan.report import LOADER_IMAGES_PER_WORKER, describe, loader_workers


def _plan(micro_batch: int, accumulation: int, step_seconds: float) -> Plan:
    kinds = ("weights", "gradients", "optimizer", "buffers", "activations", "transient", "allowance", "total")
    return Plan(params=87_000_000, micro_batch=micro_batch, accumulation=accumulation, zero_stage=1,
                checkpoint_activations=False, attn_chunk_size=0, per_rank_bytes=dict.fromkeys(kinds, 0),
                host_bytes=0, fits=True, max_micro_batch=micro_batch, step_seconds=step_seconds,
                compute_seconds=step_seconds, comm_seconds=0.0, forward_flops_per_image=23_900_000_000,
                gpu_memory=80 * 2**30)


def test_workers_per_gpu_follow_from_the_step_time_and_the_measured_worker_rate():
    # SwinV2-B at 192 px: 71.8 GFLOP to train on one image; an H100 at 989 TFLOP/s (bf16) and 30 % MFU trains
    # 989e12 * 0.3 / 71.8e9 = 4132.3 images/s; at 500 images/s per worker that is 8.26, so 9 workers.
    rate = 989e12 * 0.3 / 71.8e9
    plan = _plan(128, 2, step_seconds=256 / rate)
    assert LOADER_IMAGES_PER_WORKER == 500
    got_rate, workers = loader_workers(plan)
    assert got_rate == pytest.approx(4132.3, abs=0.1) and workers == 9
    assert loader_workers(_plan(64, 1, step_seconds=1.0)) == (64.0, 1)  # a slow step still needs one worker
    assert loader_workers(_plan(100, 1, step_seconds=0.1)) == (1000.0, 2)  # exactly two workers' worth
    line = describe(plan, Cluster(GPUS["h100-80gb"], 1), "B").splitlines()[-1]
    assert line == ("  data: 4,132 images/s per GPU need 9 DataLoader workers per GPU (data.num_workers) at 500 "
                    "images/s each (benchmarks/loader_speed.py; measure your host's)")
