"""Pretraining through the real launcher with its monitors (held-out loss, kNN probe, fixed held-out grids at step
0, every ``eval.every_steps`` and at the end: console, offline wandb, PNGs), and the demo's pretrained encoder
reaching the demo fine-tune model bit for bit."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from data_helpers import labelled_shards
from pretrain_helpers import NO_MONITORS, PRETRAIN, describe, pretrain_cmd, run, wandb_history

from swinv2.finetune.config import FinetuneConfig
from swinv2.finetune.weights import build_classifier, load_pretrained
from swinv2.train.config import load_config
from swinv2.train.consolidate import consolidated_state_dict

pytestmark = pytest.mark.slow

EVAL_LINE = re.compile(r"^eval step (\d+): held-out loss (\S+) \((\d+) images; predicting zero (\S+)\), "
                       r"kNN top-1 (\S+) \((\d+) queries, k=5\)$")


def test_pretraining_reports_heldout_loss_knn_and_fixed_grids(tmp_path):
    bank, _ = labelled_shards(tmp_path / "bank", [12, 8], prefix="bank")
    queries, _ = labelled_shards(tmp_path / "queries", [5, 4], prefix="query")
    heldout, _ = labelled_shards(tmp_path / "heldout", [3, 4], prefix="held")  # labels unused: images only
    out = tmp_path / "run"
    result = run(pretrain_cmd(
        out, "run.max_steps=5", "eval.every_steps=2", "eval.num_images=4", "wandb.mode=offline", "probe.k=5",
        f"data.eval_urls={'::'.join(heldout)}", f"probe.train_urls={'::'.join(bank)}",
        f"probe.eval_urls={'::'.join(queries)}"))
    assert result.returncode == 0, describe(result)
    evals = [EVAL_LINE.match(line) for line in result.stdout.splitlines() if line.startswith("eval step")]
    assert all(evals), describe(result)
    assert [int(m[1]) for m in evals] == [0, 2, 4, 5]  # the start, every 2 steps, the last step
    assert {(int(m[3]), int(m[6])) for m in evals} == {(7, 9)}  # every held-out image and query, once
    assert len({m[4] for m in evals}) == 1  # predicting zero: a property of the images and masks, not the weights
    history = wandb_history(next((out / "wandb").glob("offline-run-*/run-*.wandb")))
    for m in evals:
        logged = history[int(m[1])]
        assert logged["eval/heldout_loss"] == pytest.approx(float(m[2]), rel=1e-3)
        assert logged["eval/knn_top1"] == pytest.approx(float(m[5]), abs=0.01)
        assert logged["eval/heldout_loss_zero"] == pytest.approx(float(m[4]), rel=1e-3)
        assert 0 <= logged["eval/knn_top1"] <= 100 and logged["eval/heldout_loss"] > 0
    for step in (0, 2, 4, 5):
        assert (out / "images" / f"heldout_reconstruction_{step:08d}.png").is_file()


def test_demo_encoder_reaches_the_demo_fine_tune_model_bit_for_bit(tmp_path):
    out = tmp_path / "demo"
    result = run([sys.executable, PRETRAIN, f"run.output_dir={out}", "run.max_steps=3", "wandb.mode=disabled",
                  "data.num_workers=0", *NO_MONITORS])
    assert result.returncode == 0, describe(result)
    cfg = load_config(FinetuneConfig, "configs/finetune/demo.yaml", [f"pretrained={out}"])
    model = build_classifier(cfg.model)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    report = load_pretrained(model, cfg.pretrained)
    checkpoint = consolidated_state_dict(out)
    state = model.state_dict()
    encoder = {k for k in state if not k.startswith("head.")}
    assert {f"encoder.{k}" for k in encoder} <= set(checkpoint)
    for name in encoder:
        assert torch.equal(state[name], checkpoint[f"encoder.{name}"]), name  # bit-exact, stage norms included
    # The SimMIM encoder has no head: the classifier's head is the one thing not loaded (it keeps its own init).
    assert sorted(report.loaded) == sorted(encoder), str(report)
    assert set(report.missing) | {r.split(":")[0] for r in report.reinitialized} <= {"head", "head.weight",
                                                                                      "head.bias"}, str(report)
    for k, v in head_before.items():
        assert torch.equal(state[k], v)  # the head keeps the classifier's own initialisation
    # Everything the checkpoint holds beyond the encoder is SimMIM's: the mask token and the decoder.
    assert set(checkpoint) - {f"encoder.{k}" for k in encoder} == {"mask_token", "decoder.0.weight",
                                                                   "decoder.0.bias"}
