"""Shared test helpers: small model configs and weight randomisation (so parity is not trivially true)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

# DeepSpeed JIT-builds a small op with whichever `ninja` comes first on PATH. The venv's (pip) ninja and a system one
# write incompatible build logs, so alternating between them rebuilds the op (~90 s) over and over: the tests and
# every process they start use the venv's.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# One thread per process: the suite runs two test files at once (pytest-xdist, pyproject.toml) and many tests start
# training processes (two ranks each under the deepspeed launcher). The models here are tiny, so a second thread
# gains little while two threads per process oversubscribe the cores: two 1-thread demo fine-tunes side by side took
# 46 s against 68 s for the same two one after the other with 2 threads each (2-core VM). Set before any test starts
# a process, which inherits it; an explicit OMP_NUM_THREADS is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests need a GPU: without one they are skipped, and the skip says where they run."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run benchmarks/gpu_check.py (or pytest -m cuda) on one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
