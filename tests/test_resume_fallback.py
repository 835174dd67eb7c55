"""Resuming from a damaged checkpoint folder and with settings that would change the model or the schedule
(:mod:`swinv2.train.checkpoint_manager`, :func:`swinv2.train.run.check_resumable`): real checkpoints written by a
real pretraining run (one process, DeepSpeed on gloo), damaged by hand as a user or a failing disk would."""

from __future__ import annotations

import json
import shutil

import pytest
from pretrain_helpers import describe, pretrain_cmd, run

from simmim.config import PretrainConfig
from swinv2.train.checkpoint_manager import MARKER, CheckpointManager
from swinv2.train.config import ConfigError, load_config
from swinv2.train.run import check_resumable

pytestmark = pytest.mark.slow

MODEL_FILE = "mp_rank_00_model_states.pt"


def _damaged(folder, tag: str, how: str) -> str:
    """Damage checkpoint ``tag`` of ``folder`` in one of the ways a user or a disk does; returns the file touched."""
    ckpt = folder / tag
    if how == "deleted":
        (ckpt / MODEL_FILE).unlink()
        return MODEL_FILE
    if how == "truncated":
        optimizer = next(ckpt.glob("*optim_states.pt"))
        optimizer.write_bytes(optimizer.read_bytes()[:100])
        return optimizer.name
    if how == "corrupt json":
        (ckpt / MARKER).write_text('{"step": 4, "wor')
    else:  # incomplete json: parses, but the step is missing
        meta = json.loads((ckpt / MARKER).read_text())
        del meta["step"]
        (ckpt / MARKER).write_text(json.dumps(meta))
    return MARKER


def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path):
    out = tmp_path / "run"
    first = run(pretrain_cmd(out, "run.max_steps=4", "checkpoint.every_steps=2", "run.image_every=0"))
    assert first.returncode == 0, describe(first)
    folder = out / "checkpoints"
    meta = json.loads((folder / "step00000004" / MARKER).read_text())
    assert meta["files"][MODEL_FILE] == (folder / "step00000004" / MODEL_FILE).stat().st_size  # sizes recorded

    # Every kind of damage, one at a time on a copy: the checkpoint is skipped for step 2's, naming what is wrong.
    for how in ("deleted", "truncated", "corrupt json", "incomplete json"):
        copy = tmp_path / how.replace(" ", "_")
        shutil.copytree(folder, copy)
        touched = _damaged(copy, "step00000004", how)
        manager = CheckpointManager(copy, keep_last=3, rank=0)
        assert manager.resume_point(world_size=1).tag == "step00000002", how
        assert manager.complete_tags() == ["step00000002"]
        assert touched in manager.damage("step00000004"), manager.damage("step00000004")
    # Nothing intact left: one sentence instead of starting over (which would write over the run).
    _damaged(tmp_path / "deleted", "step00000002", "truncated")
    with pytest.raises(ConfigError, match="no intact one is left to resume from: restore it, or start over"):
        CheckpointManager(tmp_path / "deleted", keep_last=3, rank=0).resume_point(world_size=1)

    # The real resume: step 4's model file was deleted; the run goes on from step 2 and says why.
    _damaged(folder, "step00000004", "deleted")
    resumed = run(pretrain_cmd(out, "run.max_steps=5", "checkpoint.every_steps=2", "run.image_every=0"))
    assert resumed.returncode == 0, describe(resumed)
    assert (f"checkpoint {folder / 'step00000004'} is damaged ({MODEL_FILE} is missing): skipped, resuming from "
            f"{folder / 'step00000002'} instead") in resumed.stdout, describe(resumed)
    assert f"resumed from {folder / 'step00000002'} at step 2" in resumed.stdout
    assert "stopped at step 5 (max_steps)" in resumed.stdout

    # The same run's config, resumed with another window, input size, or on another number of ranks.
    saved = json.loads((folder / "step00000005" / MARKER).read_text())["config"]

    def check(*overrides: str, world: int = 1) -> None:
        cfg = load_config(PretrainConfig, out / "config.yaml", overrides=list(overrides))
        check_resumable(saved, cfg, folder / "step00000005", saved_world=1, world=world)

    check()  # as it was: fine
    for key, value in (("window_size", 8), ("img_size", 128)):
        with pytest.raises(ConfigError, match=f"trained with model.{key}="):
            check(f"model.{key}={value}")
    # data.samples_per_epoch counts per rank: 80 on 1 rank is 10 steps an epoch, on 2 ranks it would be 20.
    with pytest.raises(ConfigError) as refused:
        check(world=2)
    assert str(refused.value) == (
        f"checkpoint {folder / 'step00000005'} was trained on 1 rank(s) with data.samples_per_epoch=80 per rank (80 "
        "samples per epoch), and on 2 rank(s) data.samples_per_epoch=80 makes 160, which would rescale the whole LR "
        "schedule: set data.samples_per_epoch=40 to keep it, or start over with resume=false")
    check("data.samples_per_epoch=40", world=2)  # the same epoch: fine
