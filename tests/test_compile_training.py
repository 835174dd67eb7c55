"""``run.compile=true``: the model inside the DeepSpeed engine runs under ``torch.compile`` (inductor) and trains like
the eager model; ZeRO-3 is refused at start-up.

The engine compiles in place (DeepSpeed's ``engine.compile()``, i.e. ``nn.Module.compile``), so the module, its
``state_dict`` keys and therefore checkpoints, consolidation, resuming and the fine-tune's load of a pretrained run
are those of an eager run; that is checked through the real launchers. Inductor compiling the tiny model's training
graphs is what these tests mostly spend: measured 10 s for one process on an idle 2-core machine, 30-110 s for each
of two processes sharing 2 busy cores (its kernel cache makes later compilations of the same shapes cheaper).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from pretrain_helpers import BIN, ROOT, TINY, describe, free_port, pretrain_cmd, run

from simmim.config import PretrainConfig
from simmim.pretrain import build_simmim
from swinv2.train.config import load_config
from swinv2.train.consolidate import consolidated_state_dict

HELPER = str(ROOT / "tests" / "helpers" / "engine_curves.py")
STEPS = 12


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    """12 steps on 2 processes, eager and compiled: ZeRO-1 (micro batch 4, no accumulation) and ZeRO-2 (micro batch
    4, 2 accumulation steps), fp32 on the same fixed batches from the same initial weights. The same micro batch
    shape lets the second compiled run reuse inductor's cached kernels."""
    out = tmp_path_factory.mktemp("compile") / "curves.json"
    z1 = ["deepspeed.zero_stage=1", "data.batch_size=4"]
    z2 = ["deepspeed.zero_stage=2", "data.batch_size=4", "deepspeed.global_batch=16"]
    result = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), HELPER,
                  "--out", str(out), "--steps", str(STEPS),
                  "--run", "zero1_eager", *z1, "--run", "zero1_compiled", *z1, "run.compile=true",
                  "--run", "zero2_eager", *z2, "--run", "zero2_compiled", *z2, "run.compile=true"])
    assert result.returncode == 0, describe(result)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_compiled_training_follows_the_eager_loss_curve(curves, stage):
    eager, compiled = curves[f"zero{stage}_eager"], curves[f"zero{stage}_compiled"]
    assert not eager["compiled"] and compiled["compiled"]
    assert compiled["world_size"] == 2 and compiled["accumulation"] == stage  # the ZeRO-2 run accumulates 2
    losses = np.array(eager["losses"])
    assert losses[-3:].mean() < 0.9 * losses[:3].mean(), losses  # the reference trains
    # The first step starts from the same weights: only inductor's fused, reordered float32 arithmetic differs
    # (measured: 8e-8 relative).
    assert compiled["losses"][0] == pytest.approx(eager["losses"][0], rel=1e-6)
    # Later steps inherit and amplify such last-bit differences (Adam divides by the root of tiny second moments), as
    # any change of summation order does. Measured over these 12 steps: eager ZeRO-2 accumulating 2 micro batches of
    # 2 against eager ZeRO-1 with one of 4 (the same global batch and arithmetic, another order of sums) differs by
    # up to 1.4e-4 in the loss and 2.5e-3 in the gradient norm; compiled against eager by 8.8e-6 / 1.4e-4 (ZeRO-1)
    # and 1.0e-4 / 1.0e-3 (ZeRO-2). The bounds allow that reordering noise and are far below how much the loss moves
    # over these steps (0.75 to 0.61).
    np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=5e-4)
    np.testing.assert_allclose(compiled["grad_norms"], eager["grad_norms"], rtol=1e-2)
    print(f"ZeRO-{stage}: largest relative loss difference "
          f"{np.max(np.abs(np.array(compiled['losses']) - losses) / losses):.1e}; first step "
          f"{compiled['seconds'][0]:.1f} s compiled against {eager['seconds'][0]:.1f} s eager")


@pytest.mark.slow
def test_compile_with_zero3_is_a_config_error(tmp_path):
    result = run(pretrain_cmd(tmp_path / "run", "deepspeed.zero_stage=3", "run.compile=true"))
    assert result.returncode == 2, describe(result)
    errors = [line for line in result.stderr.splitlines() if "run.compile" in line]
    assert len(errors) == 1 and "deepspeed.zero_stage=3" in errors[0], describe(result)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.slow
def test_compiled_run_checkpoints_resumes_consolidates_and_fine_tunes(tmp_path):
    """The real launchers with ``run.compile=true``: pretraining for 3 steps, resumed to 5, consolidated to the
    model's own keys; then a fine-tune from it (its loader reads the pretrained run) that trains and evaluates
    (the evaluation calls the compiled module in eval mode)."""
    pre = tmp_path / "pretrain"
    first = run(pretrain_cmd(pre, "run.max_steps=3", "run.compile=true"))
    assert first.returncode == 0, describe(first)
    resumed = run(pretrain_cmd(pre, "run.max_steps=5", "run.compile=true"))
    assert resumed.returncode == 0, describe(resumed)
    assert f"resumed from {pre / 'checkpoints' / 'step00000003'} at step 3" in resumed.stdout, describe(resumed)
    assert "stopped at step 5 (max_steps)" in resumed.stdout

    state = consolidated_state_dict(pre)

    cfg = load_config(PretrainConfig, ROOT / "configs" / "demo.yaml", TINY)
    assert state.keys() == build_simmim(cfg).state_dict().keys()  # no "_orig_mod." from a compiled wrapper

    ft = tmp_path / "finetune"
    tuned = run([sys.executable, "launch/finetune.py", "--config", "configs/finetune/demo.yaml", f"pretrained={pre}",
                 f"run.output_dir={ft}", "wandb.mode=disabled", "run.compile=true", "model.embed_dim=16",
                 "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "model.img_size=64", "model.window_size=4",
                 "model.pretrained_window_sizes=[4,4,4,2]", "data.num_workers=0", "data.batch_size=16",
                 "data.eval_batch_size=100", "deepspeed.global_batch=16", "data.samples_per_epoch=48",
                 "schedule.epochs=1", "run.log_every=1", "ema.enabled=false"])
    assert tuned.returncode == 0, describe(tuned)
    report = (ft / "load_report.txt").read_text()
    assert "DeepSpeed checkpoint, SimMIM (encoder)" in report
    history = json.loads((ft / "metrics.json").read_text())
    assert history and history[-1]["eval/count"] > 0 and 0 <= history[-1]["eval/top1"] <= 100
