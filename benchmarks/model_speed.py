"""Our Swin model against timm's same architecture with the same weights, in one run.

Measures inference and training-step (forward + backward) throughput in images/s and peak memory, and
reports our/timm ratios. Each round times both sides back to back (alternating which goes first); the ratio is
the median of the per-round ratios, so background load hits both sides alike.

Then our training step on each attention path: SDPA (the default; on the CPU its unfused math kernel), the
explicit reference (``fused_attn=False``) and, on the CPU, the hand-written kernel of ``cpu_kernels=True``.
For each: the median step time and the memory the step keeps for its backward (the bytes of every tensor
autograd saves, counted once per storage; on a GPU also the peak allocated memory).

    python benchmarks/model_speed.py --model swinv2_tiny_window8_256 --batch 8            # CPU, fp32
    python benchmarks/model_speed.py --cpu-kernels                                       # ours with cpu_kernels=True
    python benchmarks/model_speed.py --model swinv2_base_window12_192 --batch 64 --dtype bf16   # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

import swinv2
from swinv2.attention import WindowAttention


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (KiB on Linux)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def saved_for_backward_mb(step) -> float:
    """MiB of the tensors autograd saves during ``step()`` (each storage once): the activation memory of a
    training step, the same count on any device."""
    storages: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values()) / 2**20


def set_attention_path(model: torch.nn.Module, path: str) -> None:
    """``sdpa``, ``explicit`` or ``cpu_kernel`` on every window attention of ``model``."""
    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.fused = path != "explicit"
            module.cpu_kernels = path == "cpu_kernel"


def paired_rounds(steps: dict, repeats: int, device: torch.device) -> tuple[dict[str, list[float]], float]:
    """Time each side once per round, alternating which goes first; returns the times and the median of the
    per-round speed ratios (first side over second). Pairing cancels the slow drifts of a shared machine
    (+-10 % here) that a ratio of two separate medians would keep."""
    (a, step_a), (b, step_b) = steps.items()
    times: dict[str, list[float]] = {a: [], b: []}
    ratios = []
    for i in range(repeats):
        order = ((a, step_a), (b, step_b)) if i % 2 == 0 else ((b, step_b), (a, step_a))
        for name, step in order:
            times[name].append(timed(step, device))
        ratios.append(times[b][-1] / times[a][-1])
    return times, statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swinv2_tiny_window8_256")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per side and mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cpu-kernels", action="store_true", help="build ours with cpu_kernels=True")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    ours = swinv2.create_model(args.model, cpu_kernels=args.cpu_kernels).to(device)
    ref = timm.create_model(args.model).to(device)
    ref.load_state_dict(swinv2.export_timm_state_dict(ours))
    x = torch.randn(args.batch, 3, *ours.img_size, device=device)
    target = torch.randint(0, ours.num_classes, (args.batch,), device=device)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    autocast = torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None)

    def infer(model):
        model.eval()
        with torch.inference_mode(), autocast:
            model(x)

    def train(model):
        model.train()
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    results = {}
    for mode, step in (("inference", infer), ("train_step", train)):
        times = {"ours": [], "timm": []}
        peaks = {}
        for name, model in (("ours", ours), ("timm", ref)):  # warm-up (and per-side peak memory on GPU)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step(model)
            step(model)
            peaks[name] = peak_memory_mb(device)
        sides = {"ours": lambda f=step: f(ours), "timm": lambda f=step: f(ref)}
        times, ratio = paired_rounds(sides, args.repeats, device)
        speed = {name: args.batch / statistics.median(t) for name, t in times.items()}
        results[mode] = {
            "ours_img_s": round(speed["ours"], 2),
            "timm_img_s": round(speed["timm"], 2),
            "speed_ratio": round(ratio, 3),
            "ours_peak_mb": round(peaks["ours"], 1),
            "timm_peak_mb": round(peaks["timm"], 1),
        }
        print(f"{mode:10s} ours {speed['ours']:8.2f} img/s  timm {speed['timm']:8.2f} img/s  "
              f"ratio {ratio:.3f}  peak MB ours {peaks['ours']:.0f} timm {peaks['timm']:.0f}")
    paths = ["sdpa", "explicit"] + (["cpu_kernel"] if device.type == "cpu" else [])
    results["attention_paths"] = {}
    for path in paths:
        set_attention_path(ours, path)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        kept = saved_for_backward_mb(lambda: train(ours))
        row = {"saved_for_backward_mb": round(kept, 1)}
        if device.type == "cuda":
            row["peak_allocated_mb"] = round(peak_memory_mb(device), 1)
        timings = [timed(lambda: train(ours), device) for _ in range(max(1, args.repeats // 3))]
        row["step_s"] = round(statistics.median(timings), 4)
        results["attention_paths"][path] = row
        print(f"train step, {path:10s} attention: kept for backward {kept:8.1f} MB  "
              + (f"peak {row['peak_allocated_mb']:8.1f} MB  " if device.type == "cuda" else "")
              + f"median {row['step_s']:.3f} s")
    meta = {"model": args.model, "batch": args.batch, "dtype": args.dtype, "device": str(device),
            "cpu_kernels": args.cpu_kernels,
            "torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads()}
    print(json.dumps({**meta, **results}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, **results}, f, indent=2)


if __name__ == "__main__":
    main()
