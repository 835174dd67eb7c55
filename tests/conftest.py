"""Shared test helpers: small model configs and weight randomisation (so parity is not trivially true)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

# The tests and every process they start use this venv's tools first (its deepspeed launcher; and its ninja, should
# anything JIT-build: the venv's and a system ninja write incompatible build logs and rebuild each other's output).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# One thread per process: the suite runs two test files at once (pytest-xdist, pyproject.toml) and many tests start
# training processes (two ranks each under the deepspeed launcher). The models here are tiny, so a second thread
# gains little while two threads per process oversubscribe the cores: two 1-thread demo fine-tunes side by side took
# 46 s against 68 s for the same two one after the other with 2 threads each (2-core VM). Set before any test starts
# a process, which inherits it; an explicit OMP_NUM_THREADS is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The longest files first (measured 2026-12-07, seconds on the 2-core VM with 2 workers): the two workers then end
# together instead of one starting a long file when the other has nothing left. Files not listed follow in order.
LONGEST_FIRST = ("test_compile_training.py",  # 417
                 "test_pretraining_pays_off.py",  # 384
                 "test_reliability.py",  # 188
                 "test_export_bf16.py",  # 176
                 "test_finetune_e2e.py",  # 131
                 "test_pretrain.py",  # 115
                 "test_compile.py",  # 114
                 "test_nonfinite.py",  # 106
                 "test_plan_cli.py")  # 97


# Small stand-ins for the published variants: same code paths (shifted/clipped windows, merging, CPB), CPU-sized.
TINY_V2 = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.0)
TINY_V1 = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.0)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial values; V2 block norms start at zero, which would hide most of the model."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("logit_scale"):
            p.copy_(torch.log(1 + 20 * torch.rand(p.shape, generator=gen)))  # some heads beyond the clamp at log(100)
            p.view(-1)[0] = math.log(150.0)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * noise)
        elif name.endswith("relative_position_bias_table"):
            p.copy_(noise)
        else:
            p.copy_(0.05 * noise)
    return model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first; ``cuda`` tests need a GPU: without one they are skipped, saying where they run."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run benchmarks/gpu_check.py (or pytest -m cuda) on one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
