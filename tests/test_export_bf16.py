"""Consolidating bf16 runs that sum gradients in float32 (``data_types.grad_accum_dtype``): real 2-rank pretraining
runs (``deepspeed --num_gpus 2 launch/pretrain.py``), 2 micro batches per step, ZeRO 1, 2 and 3.

ZeRO-1 then runs DeepSpeed's ``BF16_Optimizer``, whose checkpoints ``zero_to_fp32`` refuses ("is not a zero
checkpoint"); ``consolidated_state_dict`` reads them itself. For every stage the consolidated weights must equal the
fp32 master weights as DeepSpeed's own universal conversion reassembles them (``<tag>_universal/zero/<name>/fp32.pt``)
and, where the module file holds the bf16 weights (ZeRO-1/2), round to them exactly; ``launch/convert.py`` writes
them, and a fine-tune (``launch/finetune.py pretrained=<run dir>``) loads the ZeRO-1 run with only the head missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from pretrain_helpers import CONVERT, describe, pretrain_cmd, run
from safetensors.torch import load_file

from swinv2.train.checkpoint_manager import CheckpointManager
from swinv2.train.consolidate import consolidated_state_dict, locate
from swinv2.train.safe_load import weights_only_loads

pytestmark = pytest.mark.slow

STEPS = 3
# 2 ranks x micro batch 4 x 2 accumulation steps; bf16, so gradients are summed in float32 (BF16_Optimizer for ZeRO-1).
ACCUMULATE = ["deepspeed.precision=bf16", "data.batch_size=4", "deepspeed.global_batch=16", f"run.max_steps={STEPS}"]


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda stage: f"zero{stage}")
def bf16_run(request, tmp_path_factory) -> tuple[int, Path]:
    stage = request.param
    out = tmp_path_factory.mktemp(f"bf16_zero{stage}") / "run"
    result = run(pretrain_cmd(out, *ACCUMULATE, f"deepspeed.zero_stage={stage}", world=2))
    assert result.returncode == 0, describe(result)
    assert f"stopped at step {STEPS}" in result.stdout + result.stderr, describe(result)
    return stage, out


def universal_fp32(run_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights as DeepSpeed's universal conversion writes them (its own reassembly of the ranks'
    partitions, from the fragment addresses its optimizers record)."""
    folder, tag = locate(run_dir)
    CheckpointManager(folder, keep_last=0, rank=0).ensure_universal(tag)
    zero = folder / f"{tag}_universal" / "zero"
    out = {}
    with weights_only_loads(zero):
        for p in zero.iterdir():
            if (p / "fp32.pt").is_file():
                saved = torch.load(p / "fp32.pt", map_location="cpu", weights_only=True)
                out[p.name] = saved["param"] if isinstance(saved, dict) else saved  # ZeRO-3's: the tensor alone
    return out


def test_consolidated_weights_are_the_fp32_master_weights(bf16_run):
    stage, run_dir = bf16_run
    folder, tag = locate(run_dir)
    if stage == 1:  # the BF16_Optimizer's layout: optimizer files without a ZeRO stage
        files = sorted((folder / tag).glob("*_optim_states.pt"))
        assert len(files) == 2 and all(f.name.startswith("bf16_zero_pp_rank_") for f in files)
        with weights_only_loads(files[0]):
            optim = torch.load(files[0], map_location="cpu", weights_only=True)["optimizer_state_dict"]
        assert "zero_stage" not in optim and "single_partition_of_fp32_groups" in optim
    state = consolidated_state_dict(run_dir)
    master = universal_fp32(run_dir)
    params = set(master)
    assert params and params <= set(state)
    for name in params:
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], master[name].reshape(state[name].shape)), name
    if stage in (1, 2):  # the module file holds the bf16 weights, the fp32 master copy rounded
        with weights_only_loads(folder / tag):
            module = torch.load(folder / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                                weights_only=True)["module"]
        for name in params:
            assert module[name].dtype == torch.bfloat16, name
            assert torch.equal(state[name].to(torch.bfloat16), module[name]), name
        assert set(module) == set(state)  # persistent buffers (none in this model) come from the module file
    # The weights moved from their initial values: the steps were taken.
    assert any(not torch.equal(state[k], state[k].to(torch.bfloat16).float()) for k in params)


def test_convert_writes_the_consolidated_weights(bf16_run, tmp_path):
    _, run_dir = bf16_run
    result = run([sys.executable, CONVERT, str(run_dir), str(tmp_path / "exported")])
    assert result.returncode == 0, describe(result)
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    state = consolidated_state_dict(run_dir)
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)
    encoder = load_file(str(tmp_path / "exported" / "encoder.safetensors"))
    assert encoder and all(torch.equal(encoder[k], state[f"encoder.{k}"]) for k in encoder)


def test_fine_tune_loads_the_bf16_optimizer_run(bf16_run, tmp_path):
    stage, run_dir = bf16_run
    if stage != 1:
        pytest.skip("the BF16_Optimizer runs ZeRO-1 only; ZeRO-2/3 consolidate through zero_to_fp32 as before")
    out = tmp_path / "finetune"
    result = run([sys.executable, "launch/finetune.py", "--config", "configs/finetune/demo.yaml",
                  f"pretrained={run_dir}", f"run.output_dir={out}", "wandb.mode=disabled", "run.max_steps=1",
                  "model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "data.num_workers=0",
                  "data.batch_size=8", "deepspeed.global_batch=8", "ema.enabled=false"])
    assert result.returncode == 0, describe(result)
    report = (out / "load_report.txt").read_text()
    assert f"pretrained weights: {run_dir}" in report and "DeepSpeed checkpoint, SimMIM (encoder)" in report, report
    assert "re-initialised" not in report, report
    # Only the new classifier is missing: "missing (kept their initial values) (2):" then head.weight and head.bias.
    lines = report.splitlines()
    first = lines.index("missing (kept their initial values) (2):")
    assert {line.strip() for line in lines[first + 1:first + 3]} == {"head.weight", "head.bias"}, report
