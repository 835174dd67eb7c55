"""A training process starts without timm (whose import pulls in torchvision: about 2.5 s of CPU per process), and
the two pieces Swin took from it draw exactly timm's random numbers, so weights and runs are unchanged."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers.pretrain_helpers import ROOT, env
from timm.layers import DropPath as TimmDropPath
from timm.layers import trunc_normal_ as timm_trunc_normal_

from swinv2.layers import DropPath, trunc_normal_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mean, std, a, b", [(0.0, 0.02, -2.0, 2.0), (0.1, 0.5, -1.0, 1.0), (0.0, 1.0, -0.5, 3.0)])
def test_trunc_normal_draws_timms_numbers(dtype, mean, std, a, b):
    ours, theirs = torch.empty(300, 17, dtype=dtype), torch.empty(300, 17, dtype=dtype)
    torch.manual_seed(7)
    trunc_normal_(ours, mean=mean, std=std, a=a, b=b)
    torch.manual_seed(7)
    timm_trunc_normal_(theirs, mean=mean, std=std, a=a, b=b)
    assert torch.equal(ours, theirs)
    assert ours.min() >= a and ours.max() <= b and ours.std() > 0


def test_drop_path_drops_timms_samples_and_is_the_identity_in_eval():
    x = torch.randn(64, 5, 8, requires_grad=True)
    ours, theirs = DropPath(0.3), TimmDropPath(0.3)
    torch.manual_seed(3)
    y = ours(x)
    torch.manual_seed(3)
    assert torch.equal(y, theirs(x))
    kept = (y != 0).flatten(1).all(1)
    assert 0 < kept.sum() < 64 and torch.allclose(y[kept], x[kept] / 0.7)  # whole samples dropped, the rest scaled
    y.sum().backward()
    assert torch.allclose(x.grad[kept], torch.full_like(x[kept], 1 / 0.7)) and (x.grad[~kept] == 0).all()
    assert ours.eval()(x) is x and DropPath(0.0)(x) is x


def test_building_and_training_imports_no_timm_or_torchvision():
    code = ("import sys, torch, simmim, simmim.commands.pretrain, swinv2.commands.finetune, swinv2.commands.convert\n"
            "from simmim.pretrain import build_simmim\n"
            "from simmim.config import PretrainConfig\n"
            "from swinv2.train.config import load_config\n"
            "cfg = load_config(PretrainConfig, 'configs/demo.yaml', ['model.drop_path_rate=0.1'])\n"
            "model = build_simmim(cfg).train()\n"
            "images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 16, 16, dtype=torch.bool)\n"
            "model(images, mask).backward()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision')))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
