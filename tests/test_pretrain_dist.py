"""Two processes (``deepspeed --num_gpus 2``, gloo on CPU) train like one: the same loss curve, LRs and gradient
norms with ZeRO-2 and ZeRO-3 (with and without gradient accumulation) as one process with the same global batch;
and a ZeRO-3 checkpoint converts to exactly the weights the ranks held.

The real data loader gives each rank its own shard stream, so it cannot give identical curves; the helper
``tests/helpers/pretrain_parity.py`` feeds every process the same fixed global batches instead (rank r takes slice r)
and trains them with the real engine of ``swinv2.train.engine.build_engine``.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from pretrain_helpers import BIN, CONVERT, ROOT, describe, free_port, run

HELPER = str(ROOT / "tests" / "helpers" / "pretrain_parity.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """One process with ZeRO-1 as in the demo (micro batch = global batch 8); then two processes: ZeRO-2 with
    micro batch 4, ZeRO-3 with micro batch 4, and ZeRO-3 with micro batch 2 and 2 accumulation steps, whose engine
    is saved."""
    tmp = tmp_path_factory.mktemp("parity")
    one = run([sys.executable, HELPER, "--out", str(tmp / "one.json"), "--runs", "1:8"])
    assert one.returncode == 0, describe(one)
    two = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), HELPER,
               "--out", str(tmp / "two.json"), "--runs", "2:4,3:4,3:2", "--checkpoint", str(tmp / "zero3")])
    assert two.returncode == 0, describe(two)
    return json.loads((tmp / "one.json").read_text()), json.loads((tmp / "two.json").read_text()), tmp / "zero3"


def test_two_processes_zero2_and_zero3_follow_the_one_process_loss_curve(parity):
    one, two, _ = parity
    reference = one["zero1_micro8"]
    losses = reference["losses"]
    # The reference actually trains (otherwise equal curves would prove little), with clipping active.
    assert losses[-1] < 0.9 * losses[0], losses
    assert max(reference["grad_norms"]) > 0.3  # the helper's clip threshold
    assert set(two) == {"zero2_micro4", "zero3_micro4", "zero3_micro2"}
    for name, curve in two.items():
        assert curve["world_size"] == 2
        assert curve["accumulation"] == (2 if name.endswith("micro2") else 1)
        assert curve["all_partitioned"] == name.startswith("zero3")  # ZeRO-3 really partitions every parameter
        # fp32 on both sides; only the order of the sums differs (all-reduce, partitions, accumulation).
        assert curve["losses"] == pytest.approx(losses, rel=1e-4), name
        assert curve["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4), name
        assert curve["lrs"] == pytest.approx(reference["lrs"], rel=1e-12), name


def test_convert_zero3_checkpoint_gives_the_live_weights(parity, tmp_path):
    from safetensors.torch import load_file

    _, _, saved = parity
    result = run([sys.executable, CONVERT, str(saved), str(tmp_path)])
    assert result.returncode == 0, describe(result)
    model = load_file(tmp_path / "model.safetensors")
    live = load_file(saved / "live.safetensors")  # the parameters gathered from both ranks right after training
    assert model.keys() == live.keys()
    for key, value in live.items():
        assert torch.equal(model[key], value), key
    encoder = load_file(tmp_path / "encoder.safetensors")
    assert encoder.keys() == {k.removeprefix("encoder.") for k in live if k.startswith("encoder.")}
