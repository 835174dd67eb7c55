"""Planner against a real GPU: predicted and measured memory of SimMIM SwinV2-B and -L training steps.

    python benchmarks/plan_gpu_check.py --out plan_gpu_check.json     # one GPU, about a minute
    python benchmarks/plan_gpu_check.py --quick                          # SwinV2-B without checkpointing only

For each model (192/w12, bf16, ZeRO-1 on one rank, with and without activation checkpointing) it plans the step
with ``launch/plan.py``'s machinery, then runs three real DeepSpeed steps as the launcher runs them (float32 images
in, the weights in bf16 and the buffers as DeepSpeed leaves them) and reads ``torch.cuda``'s counters. Each check
runs in a process of its own: the device-wide free memory then sees only that check's CUDA context and
allocator, not an earlier check's engine (DeepSpeed's hooks keep it alive) or cached blocks.

- ``max_memory_allocated`` against the predicted tensors (total minus the allowance);
- the memory outside PyTorch's tensors (CUDA context, NCCL, allocator reserve: total - free - allocated at the
  peak) against the allowance, so ``CUDA_CONTEXT_BYTES`` and ``FRAGMENTATION`` in ``swinv2/plan/gpus.py``
  can be replaced by measured values;
- the step time against the estimate, which gives the MFU to pass as ``--mfu``.

Needs a CUDA GPU; results go to ``benchmarks/RESULTS.md`` ("Planner").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simmim.config import PretrainConfig  # noqa: E402
from simmim.plan import simmim_recipe  # noqa: E402
from simmim.pretrain import build_simmim  # noqa: E402
from swinv2.plan.gpus import GPUS, Gpu  # noqa: E402
from swinv2.plan.planner import Cluster  # noqa: E402
from swinv2.plan.search import plan_config  # noqa: E402
from swinv2.train.config import load_config  # noqa: E402
from swinv2.train.engine import build_engine, init_distributed  # noqa: E402

CONFIGS = {"base": "configs/simmim/swinv2_base_192.yaml", "large": "configs/simmim/swinv2_large_192.yaml"}
CHECKS = [(size, ckpt) for size in CONFIGS for ckpt in (False, True)]


def this_gpu() -> Gpu:
    name = torch.cuda.get_device_name().lower()
    like = GPUS["h200"] if "h200" in name else GPUS["h100-80gb"] if "h100" in name else GPUS["a100-80gb"]
    return Gpu(name, torch.cuda.get_device_properties(0).total_memory, like.peak)


def check(size: str, batch: int, checkpointing: bool) -> dict:
    overrides = [f"data.batch_size={batch}", f"deepspeed.global_batch={batch}", "deepspeed.zero_stage=1",
                 "deepspeed.precision=bf16", f"model.checkpoint_activations={str(checkpointing).lower()}"]
    cfg = load_config(PretrainConfig, ROOT / CONFIGS[size], overrides)
    cluster = Cluster(this_gpu(), world=1)
    plan = plan_config(cfg, simmim_recipe, cluster)
    torch.cuda.reset_peak_memory_stats()
    engine = build_engine(build_simmim(cfg), cfg, 1, steps_per_epoch=10)
    times = []
    for _ in range(3):
        images = torch.randn(batch, 3, 192, 192, device="cuda")  # float32, as the launcher's compute_loss
        mask = (torch.rand(batch, 48, 48, device="cuda") < 0.6).long()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine(images, mask)
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    free, total = torch.cuda.mem_get_info()
    peak = torch.cuda.max_memory_allocated()
    outside = total - free - torch.cuda.memory_reserved()
    memory = plan.per_rank_bytes
    result = {
        "model": size, "micro_batch": batch, "checkpointing": checkpointing,
        "predicted_tensors": memory["total"] - memory["allowance"], "measured_peak_allocated": peak,
        "predicted_allowance": memory["allowance"], "measured_reserved_minus_peak": torch.cuda.max_memory_reserved()
        - peak, "measured_outside_pytorch": outside,
        "predicted_compute_seconds": plan.compute_seconds, "measured_step_seconds": min(times[1:]),
        "measured_mfu": 3 * plan.forward_flops_per_image * batch / min(times[1:]) / cluster.gpu.peak["bf16"],
    }
    del engine
    return result


def each_in_its_process(out: Path, batch: int, checks: list[tuple[str, bool]]) -> list[dict]:
    """Run every check in a fresh process (``--single``); a check that fails gives a row with its exit status."""
    rows = []
    for size, ckpt in checks:
        one = out.with_name(f"{out.stem}.{size}_{'ckpt' if ckpt else 'no_ckpt'}.json")
        one.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--single", f"{size}:{int(ckpt)}", "--batch",
               str(batch), "--out", str(one)]
        code = subprocess.run(cmd, cwd=ROOT).returncode
        rows.append(json.loads(one.read_text()) if code == 0 and one.exists()
                    else {"model": size, "checkpointing": ckpt, "returncode": code})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="plan_gpu_check.json")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="one check: SwinV2-B without activation checkpointing")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # SIZE:0|1, one check in this process
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: the planner's GPU check needs a CUDA GPU; run it where one is", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    if args.single:
        size, ckpt = args.single.split(":")
        init_distributed()
        out.write_text(json.dumps(check(size, args.batch, ckpt == "1"), indent=1))
        return 0
    rows = each_in_its_process(out, args.batch, CHECKS[:1] if args.quick else CHECKS)
    out.write_text(json.dumps(rows, indent=1))
    return 0 if all("returncode" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
