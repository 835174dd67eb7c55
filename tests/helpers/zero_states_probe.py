"""Helper for tests/test_plan_states.py, run as ``deepspeed --num_gpus 2 tests/helpers/zero_states_probe.py --out F``.

For ZeRO 0-3 x fp32/bf16, one micro batch per step, and ZeRO-1 bf16 with two (DeepSpeed's ``BF16_Optimizer``,
float32 accumulation) it builds the tiny SimMIM model of the demo config, wraps it in our real engine
(``build_engine``), trains two steps on random batches and measures what the process holds: the bytes of every
live tensor storage (found with the garbage collector, each storage once, ZeRO-3 partitions included), minus what
was alive before the model was built. Measured after the second step's last backward pass (weights, gradients and
optimizer states all present) and after the second optimizer step. Writes ``{"<stage>-<precision>[-accum<N>]":
{"rank0": {...}, "rank1": {...}}}`` (:func:`run_key`). Every run has a gradient reduction bucket of 1e5 elements
(DeepSpeed's default of 5e8 would take 2 GB per rank here); ZeRO-3 bf16 keeps DeepSpeed's default persistence
threshold (small parameters stay whole), ZeRO-3 fp32 partitions every parameter (threshold 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from simmim.config import PretrainConfig  # noqa: E402
from simmim.pretrain import build_simmim  # noqa: E402
from swinv2.plan.fake import cast_buffers  # noqa: E402
from swinv2.train.config import load_config  # noqa: E402
from swinv2.train.engine import build_engine, init_distributed  # noqa: E402

TINY = ["model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "data.batch_size=2",
        "deepspeed.global_batch=4", "model.img_size=64"]
# (ZeRO stage, precision, micro batches per step); bf16 sums in float32 for ZeRO-2/3 and for ZeRO-1 with accumulation.
RUNS = [(stage, precision, 1) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")] + [(1, "bf16", 2)]


def run_key(stage: int, precision: str, accumulation: int) -> str:
    return f"{stage}-{precision}" + (f"-accum{accumulation}" if accumulation > 1 else "")


def live_bytes() -> int:
    """Bytes of every live tensor storage in this process (each storage once)."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            for t in (obj, getattr(obj, "ds_tensor", None)):
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def config_overrides(stage: int, precision: str, accumulation: int = 1) -> list[str]:
    """The overrides of one run (also used by the test to rebuild the same config for the prediction); 2 ranks."""
    out = [*TINY, f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
           f"deepspeed.global_batch={2 * 2 * accumulation}"]
    # A small gradient reduction bucket: DeepSpeed's default of 5e8 elements would take 2 GB per rank here.
    zero = {"reduce_bucket_size": 100_000}
    if stage == 3 and precision == "fp32":
        zero["stage3_param_persistence_threshold"] = 0
    extra = Path(tempfile.gettempdir()) / f"zero{stage}_{precision}_{os.getpid()}.json"
    extra.write_text(json.dumps({"zero_optimization": zero}))
    out.append(f"deepspeed.extra_json={extra}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher adds it
    args = parser.parse_args()
    rank, world = init_distributed()
    results = {}
    for stage, precision, accumulation in RUNS:
        cfg = load_config(PretrainConfig, ROOT / "configs" / "demo.yaml",
                          config_overrides(stage, precision, accumulation))
        base = live_bytes()
        torch.manual_seed(0)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        engine = build_engine(cast_buffers(build_simmim(cfg), dtype), cfg, world, steps_per_epoch=10)
        measured = {}
        assert engine.gradient_accumulation_steps() == accumulation
        for step in range(2):
            for micro in range(accumulation):
                images = torch.randn(2, 3, 64, 64, dtype=dtype)
                mask = (torch.rand(2, 16, 16) < 0.6).long()
                loss = engine(images, mask)
                del images, mask
                engine.backward(loss)
                del loss
                if step == 1 and micro == accumulation - 1:
                    measured["after_backward"] = live_bytes() - base
                engine.step()  # an optimizer step at the last micro batch only
        measured["after_step"] = live_bytes() - base
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, measured)
        results[run_key(stage, precision, accumulation)] = {f"rank{r}": m for r, m in enumerate(gathered)}
        del engine
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
