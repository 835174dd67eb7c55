"""``launch/plan.py`` end to end: the JSON plan for a real config, the search, and one-sentence errors (exit 2)."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from pretrain_helpers import ROOT, describe, run

import swinv2

PLAN = str(ROOT / "launch" / "plan.py")
PARTS = ("weights", "gradients", "optimizer", "buffers", "activations", "transient", "allowance")


def plan(*args: str):
    return run([sys.executable, PLAN, *args], timeout=600)


@pytest.mark.slow
def test_json_plan_of_a_finetuning_config():
    result = plan("--config", "configs/finetune/swinv2_base_192to224.yaml", "--gpus", "32", "--gpu", "a100-40gb",
                  "--json")
    assert result.returncode == 0, describe(result)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.device("meta"):
        model = swinv2.create_model("swinv2_base_window12_192", img_size=224, window_size=14, num_classes=1000)
    assert out["params"] == sum(p.numel() for p in model.parameters())
    memory = out["per_rank_bytes"]
    assert memory["total"] == sum(memory[k] for k in PARTS)
    assert out["fits"] == (memory["total"] <= 40 * 2**30)
    assert out["micro_batch"] == 64 and out["accumulation"] == 1  # 2048 = 64 x 32 GPUs
    assert (out["max_micro_batch"] >= 64) == out["fits"]
    # Step = compute (3x the forward over peak x MFU) + communication; the forward is at least 64 images' worth.
    assert out["step_seconds"] == out["compute_seconds"] + out["comm_seconds"]
    assert out["compute_seconds"] >= 3 * 64 * out["forward_flops_per_image"] / (312e12 * 0.4)
    assert "fits" in result.stdout and "per rank:" in result.stdout


@pytest.mark.slow  # 6 fake forwards of SwinV2-T and 24 plans
def test_search_finds_the_fastest_setting_that_fits():
    result = plan("--config", "configs/simmim/swinv2_tiny_192.yaml", "--gpus", "16", "--gpu-memory", "6",
                  "--search", "--json")
    assert result.returncode == 0, describe(result)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    best = out["best"]
    assert best["fits"] and best["per_rank_bytes"]["total"] <= 6 * 2**30
    assert 2048 % (best["micro_batch"] * 16) == 0
    rows = re.findall(r"^ +[0-3] +(?:on|off) +\d+ ", result.stdout, flags=re.M)
    assert len(rows) == 24 and "<- fastest" in result.stdout  # 4 ZeRO stages x checkpointing x 3 chunk sizes


@pytest.mark.slow  # it searches every setting before it gives up
def test_a_config_that_cannot_fit_says_why_in_one_sentence():
    result = plan("--config", "configs/simmim/swinv2_tiny_192.yaml", "--gpu-memory", "1")
    assert result.returncode == 2, describe(result)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and error.count(". ") == 0
    for words in ("does not fit", "model states", "activations", "allowance", "more memory"):
        assert words in error, error


@pytest.mark.slow  # one process: the script's own exit path (the cases below run in-process through main)
def test_bad_input_is_one_sentence_and_exit_2():
    result = plan("--config", "nope.yaml")
    assert result.returncode == 2, describe(result)
    assert "does not exist" in result.stderr.strip().splitlines()[-1]


CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def shipped_kind(path) -> str:
    """What a shipped config is, by the folder it ships in (configs/finetune/ holds the fine-tuning ones)."""
    return "fine-tuning" if "finetune" in path.relative_to(ROOT / "configs").parts else "pretraining"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_loads_with_its_own_schema(path):
    from simmim.commands.plan import load

    cfg = load(str(path), [])
    assert type(cfg).__name__ == {"pretraining": "PretrainConfig", "fine-tuning": "FinetuneConfig"}[shipped_kind(path)]


@pytest.mark.slow  # two fake forwards per config; every config is 9 minutes on 2 cores, the loading test above
# covers every config's schema, and the planning after it is the same code for all of them
@pytest.mark.parametrize("path", [ROOT / "configs" / "demo.yaml", ROOT / "configs" / "finetune" / "demo.yaml"],
                         ids=["demo", "finetune-demo"])
def test_the_demo_configs_plan_through_the_cli(path, capsys):
    from simmim.commands.plan import main

    assert main(["--config", str(path), "--json"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"{path} ({shipped_kind(path)}): " in out  # the schema its folder says
    plan = json.loads(out.strip().splitlines()[-1])
    assert plan["params"] > 0 and plan["per_rank_bytes"]["total"] > 0


def test_bad_planner_input_is_one_sentence_and_exit_2_before_any_planning(tmp_path, capsys):
    from simmim.commands.plan import main

    listed, broken = tmp_path / "list.yaml", tmp_path / "broken.yaml"
    listed.write_text("- model\n- optim\n")
    broken.write_text("model:\n  name: [swinv2\n")
    tiny, demo = str(ROOT / "configs" / "simmim" / "swinv2_tiny_192.yaml"), str(ROOT / "configs" / "demo.yaml")
    for args, words in [
        (["--config", str(listed)], "holds a list, not a mapping"),
        (["--config", str(broken)], "is not valid YAML at line 3"),
        (["--config", tiny, "model.name=swinv2_tiny_window8_265"], "e.g. swinv2_tiny_window8_256"),
        (["--config", tiny, "model.window_size=0"], "model.window_size=0 must be positive"),
        (["--config", tiny, "--gpus", "0"], "--gpus and --gpus-per-node must be positive"),
        (["--config", tiny, "model.nope=1"], "model.nope"),
        (["--config", tiny, "--gpu-memory", "-3"], "--gpu-memory"),
        (["--config", tiny, "--gpus", "3"], "deepspeed.global_batch"),
        (["--config", demo, "ema.enabled=true"], "mixes pretraining keys (probe, simmim) and fine-tuning keys (ema)"),
    ]:
        assert main(args) == 2, args
        captured = capsys.readouterr()
        assert "per rank" not in captured.out  # refused before any plan
        assert captured.err.count("\n") == 1 and words in captured.err, (args, captured.err)
