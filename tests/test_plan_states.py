"""Model-state bytes per rank predicted by the planner (swinv2.plan.states) equal what real DeepSpeed
engines hold: two ranks (``deepspeed --num_gpus 2``, gloo on CPU), ZeRO 0, 1, 2 and 3, fp32 and bf16, one launch.

The helper ``tests/helpers/zero_states_probe.py`` measures every live tensor storage of each rank after the second
backward pass (weights, gradients and optimizer states all present) and after the second optimizer step.
"""

from __future__ import annotations

import json

import pytest
import torch
from pretrain_helpers import BIN, ROOT, describe, free_port, run
from zero_states_probe import RUNS, config_overrides, run_key

from simmim.config import PretrainConfig
from simmim.pretrain import build_simmim
from swinv2.plan.fake import cast_buffers
from swinv2.plan.states import model_states
from swinv2.train.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_states") / "states.json"
    result = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                  str(ROOT / "tests" / "helpers" / "zero_states_probe.py"), "--out", str(out)])
    assert result.returncode == 0, describe(result)
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage, precision, accumulation", RUNS)
def test_model_states_equal_what_the_engine_holds(measured, stage, precision, accumulation):
    cfg = load_config(PretrainConfig, ROOT / "configs" / "demo.yaml", config_overrides(stage, precision, accumulation))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    states = model_states(cast_buffers(build_simmim(cfg), dtype), cfg, world=2)
    ranks = measured[run_key(stage, precision, accumulation)].values()
    # The planner reports the busiest rank (ZeRO-1/2 ranks keep different gradient counts after the backward).
    extra = max(r["after_backward"] for r in ranks) - (
        states.weights + states.gradients + states.optimizer + states.buffers)
    # ZeRO-1/2/3 stage gradients in a reduction bucket of 1e5 elements (ZeRO-3 allocates it up front, which the
    # planner counts). Locally the measurement equals the prediction; CI runs once held +200,000 bytes at 2-bf16 and
    # once at 3-bf16: exactly one more bucket of bf16 elements, most likely a replaced one still referenced when the
    # probe counts (at 3-bf16 still after the step). Its lifetime is DeepSpeed's, not a quantity the planner models,
    # so exactly one extra bucket is allowed after the backward and after the step (in the run's dtype, or fp32 where
    # DeepSpeed stages an fp32 accumulator). The BF16_Optimizer (ZeRO-1 with accumulation here) has no reduction
    # bucket.
    stale = {100_000 * dtype.itemsize, 100_000 * 4} if stage > 0 and accumulation == 1 else set()
    assert extra in {0, *stale}, f"{extra} bytes more than predicted"
    # ZeRO-3's gradient partition buffer and the BF16_Optimizer's fp32 gradient buffer live on; others are freed.
    after_step = max(r["after_step"] for r in ranks) - (
        states.weights + states.optimizer + states.buffers + states.kept_gradients)
    assert after_step in {0, *stale}, f"{after_step} bytes more than predicted after the step"  # (the same bucket)
    assert states.weights > 0 and states.gradients > 0 and states.optimizer > 0
