"""End to end on CPU, through the launch scripts as a user runs them: demo SimMIM pretraining (a few steps) ->
fine-tuning at twice the image size and window (stopped and resumed) -> evaluation -> export to timm; and
evaluation on 2 ranks over shards that split unevenly. The models are smaller than the demo's (one block per
stage) so the fine-tune leaves the chance plateau within a few hundred CPU steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import randomize_
from data_helpers import labelled_shards
from pretrain_helpers import NO_MONITORS
from safetensors.torch import load_file, save_file

import swinv2
from swinv2.data import DataConfig, build_loader
from swinv2.finetune.evaluation import evaluate
from swinv2.finetune.weights import write_model_json

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's deepspeed / torchrun launchers
ARCH = ["model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,2,4,8]"]
PRETRAIN = ["model.img_size=32", "model.window_size=2", "simmim.mask_patch_size=16"]  # stage windows 2, 2, 2, 1
FINETUNE = ["model.img_size=64", "model.window_size=4", "model.pretrained_window_sizes=[2,2,2,1]",
            "schedule.epochs=4", "data.auto_augment=null"]
EPOCHS, CLASSES, VAL_IMAGES = 4, 10, 500
STEPS_PER_EPOCH = 2000 // 32  # demo:train images / batch


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[:3]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 10-step SimMIM pretraining at 32 px / window 2, then 4 epochs of fine-tuning at 64 px / window 4, stopped
    after 2 epochs (``run.max_steps``) and resumed, as after a preemption. (4 epochs reach ~47 % top-1 here, the
    assertion below asks for 20 %; 6 epochs cost a third more for nothing the tests check.)"""
    tmp = tmp_path_factory.mktemp("finetune_e2e")
    pre, ft = tmp / "pretrain", tmp / "finetune"
    run(sys.executable, "launch/pretrain.py", f"run.output_dir={pre}", "run.max_steps=10", "wandb.mode=disabled",
        "data.num_workers=0", *NO_MONITORS, *ARCH, *PRETRAIN)
    command = [sys.executable, "launch/finetune.py", "--config", "configs/finetune/demo.yaml", f"pretrained={pre}",
               f"run.output_dir={ft}", "wandb.mode=disabled", *ARCH, *FINETUNE]
    run(*command, f"run.max_steps={2 * STEPS_PER_EPOCH}")
    resumed = run(*command)
    assert f"resumed from {ft / 'checkpoints' / f'step{2 * STEPS_PER_EPOCH:08d}'}" in resumed.stdout
    return {"tmp": tmp, "pretrain": pre, "finetune": ft}


def test_fine_tune_beats_chance_and_evaluates_every_epoch(runs):
    ft = runs["finetune"]
    report = (ft / "load_report.txt").read_text()
    assert "DeepSpeed checkpoint, SimMIM (encoder)" in report
    assert "normalised by pretrained windows [(2, 2), (2, 2), (2, 2), (1, 1)]" in report  # 32 px / w2 -> 64 / w4
    assert "head.weight" in report and "mask_token" in report and "decoder.0.weight" in report  # missing / dropped
    history = json.loads((ft / "metrics.json").read_text())
    assert [e["epoch"] for e in history] == list(range(1, EPOCHS + 1))  # after every epoch, the last one included
    assert all(e["eval/count"] == VAL_IMAGES and e["eval_ema/count"] == VAL_IMAGES for e in history)
    last = sorted((ft / "checkpoints").glob("step*"))[-1]
    assert last.name == f"step{EPOCHS * STEPS_PER_EPOCH:08d}" and (last / "ema.safetensors").is_file()
    best = json.loads((ft / "best.json").read_text())
    tops = [max(e["eval/top1"], e["eval_ema/top1"]) for e in history]
    assert best["top1"] == max(tops) and best["weights"] in ("model", "ema")
    assert best["top1"] > 2 * 100 / CLASSES, history  # more than twice chance on the held-out demo images


def test_evaluate_reproduces_the_best_checkpoint(runs):
    ft, out = runs["finetune"], runs["tmp"] / "eval.json"
    run(sys.executable, "launch/evaluate.py", str(ft / "best.safetensors"), "--data", "demo:val", "--batch", "100",
        "--workers", "1", "--json", str(out))
    got, best = json.loads(out.read_text()), json.loads((ft / "best.json").read_text())
    assert got["count"] == VAL_IMAGES and got["world_size"] == 1
    assert got["model"]["options"]["img_size"] == 64 and got["model"]["options"]["window_size"] == 4
    assert abs(got["top1"] - best["top1"]) <= 100 / VAL_IMAGES  # same weights, same images: at most one flips
    assert got["loss"] == pytest.approx(best["loss"], rel=1e-4)


def test_convert_to_timm_gives_the_same_logits(runs):
    out = runs["tmp"] / "exported"
    run(sys.executable, "launch/convert.py", str(runs["finetune"]), str(out), "--timm")
    spec = json.loads((out / "model.json").read_text())
    ours = swinv2.create_model(spec["name"], checkpoint=out / "model.safetensors", **spec["options"]).eval()
    config = json.loads((out / "timm_config.json").read_text())
    theirs = timm.create_model(config["model_name"], pretrained=False, **config["kwargs"]).eval()
    theirs.load_state_dict(load_file(str(out / "timm_model.safetensors")), strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        a, b = ours.double()(x), theirs.double()(x)
    assert a.shape == (2, CLASSES)
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-9
    # the exported weights are the fine-tuned ones: they differ from a fresh model's
    fresh = swinv2.create_model(spec["name"], **spec["options"]).state_dict()
    assert not torch.equal(fresh["head.weight"], ours.float().state_dict()["head.weight"])


def test_evaluation_on_two_ranks_counts_uneven_shards_exactly(tmp_path):
    paths, labels = labelled_shards(tmp_path / "shards", [7, 3, 5])  # rank 0: 7 + 5, rank 1: 3
    options = dict(img_size=32, window_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
                   num_classes=3)
    model = randomize_(swinv2.create_model("swinv2_tiny_window8_256", drop_path_rate=0.0, **options)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    write_model_json({"name": "swinv2_tiny_window8_256", "options": options}, tmp_path)
    urls, out = "::".join(paths), tmp_path / "metrics.json"
    run(str(BIN / "deepspeed"), "--num_gpus", "2", "launch/evaluate.py", str(tmp_path / "model.safetensors"),
        "--data", urls, "--batch", "4", "--workers", "0", "--crop-pct", "1.0", "--json", str(out))
    got = json.loads(out.read_text())
    assert got["world_size"] == 2 and got["count"] == len(labels) == 15
    cfg = DataConfig(eval_urls=urls, batch_size=4, num_workers=0, crop_pct=1.0)
    alone = evaluate(model, build_loader(cfg, "eval", rank=0, world_size=1, img_size=32), "cpu")  # every shard, once
    assert got["top1"] == pytest.approx(alone["top1"]) and got["top5"] == pytest.approx(alone["top5"])
    assert got["loss"] == pytest.approx(alone["loss"], rel=1e-5)


def test_zero3_fine_tune_on_two_ranks_evaluates_uneven_shards_in_lockstep(tmp_path):
    """Under ZeRO-3 a forward gathers parameters collectively, so a rank out of evaluation data must keep stepping
    (lockstep); the best weights are gathered whole. Rank 0 evaluates 12 images in 3 batches, rank 1 3 in 1.
    The weights come from a Hugging Face transformers directory (``save_pretrained`` of a masked-image model at
    32 px / window 2), fine-tuned at 64 px / window 4 as ``deepspeed launch/finetune.py pretrained=DIR``."""
    from transformers import Swinv2Config, Swinv2ForMaskedImageModeling

    hf = tmp_path / "hf"
    Swinv2ForMaskedImageModeling(Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                              num_heads=[1, 2, 4, 8], window_size=2, encoder_stride=32)
                                 ).save_pretrained(hf)
    paths, labels = labelled_shards(tmp_path / "shards", [7, 3, 5])
    out = tmp_path / "run"
    run(str(BIN / "deepspeed"), "--num_gpus", "2", "launch/finetune.py", "--config", "configs/finetune/demo.yaml",
        f"pretrained={hf}", f"run.output_dir={out}", "wandb.mode=disabled", *ARCH, *FINETUNE, "run.max_steps=2",
        "deepspeed.zero_stage=3", "deepspeed.global_batch=64", "ema.enabled=false", "data.num_workers=0",
        f"data.eval_urls={'::'.join(paths)}", "data.eval_batch_size=4")
    report = (out / "load_report.txt").read_text()
    assert "transformers" in report and "normalised by pretrained windows [(2, 2), (2, 2), (2, 2), (1, 1)]" in report
    assert "head.weight" in report and "mask_token" in report  # the new head missing, the mask token dropped
    best = json.loads((out / "best.json").read_text())
    assert best["count"] == len(labels) == 15
    weights = load_file(str(out / "best.safetensors"))
    spec = json.loads((out / "model.json").read_text())
    model = swinv2.create_model(spec["name"], **spec["options"])
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    cfg = DataConfig(eval_urls="::".join(paths), batch_size=4, num_workers=0)
    alone = evaluate(model, build_loader(cfg, "eval", rank=0, world_size=1, img_size=64), "cpu")
    assert alone["top1"] == pytest.approx(best["top1"]) and alone["loss"] == pytest.approx(best["loss"], rel=1e-5)
