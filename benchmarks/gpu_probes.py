"""The in-process measurements of ``benchmarks/gpu_check.py``: each takes a ``device`` and runs on the CPU too (tiny
sizes in tests/test_gpu_check.py), so a GPU session spends its minutes measuring, not finding a typo.

- :func:`bf16_vs_fp32_logits`: logits in fp32, under bf16 autocast and with the model cast to bf16.
- :func:`sdpa_vs_explicit`: one training step per attention path and precision (loss, gradients, memory, time).
- :func:`sdpa_backends`: which ``scaled_dot_product_attention`` kernel runs at each call site (training with
  gradients, evaluation under ``no_grad``) per window length, read from the profiler's op names, and how far the
  no-grad output is from the explicit path.
- :func:`block_memory`: one Swin block's measured peak memory (forward + backward) against the planner's count of
  what it saves (:func:`swinv2.plan.activations.count_saved` on fake tensors).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

# The aten ops behind F.scaled_dot_product_attention, one per backend (PyTorch docs, torch.nn.attention.SDPBackend).
SDPA_OPS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
    "_scaled_dot_product_attention_math": "math",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_vs_fp32_logits(device: str = "cuda", names: Iterable[str] = ("swinv2_base_window12_192",
                        "swin_base_patch4_window7_224"), batch: int = 16, **overrides) -> dict:
    """Logits in fp32, under bf16 autocast and with the model cast to bf16."""
    import swinv2

    results = {}
    for name in names:
        torch.manual_seed(0)
        model = swinv2.create_model(name, **{"num_classes": 1000, **overrides}).to(device).eval()
        x = torch.randn(batch, 3, *model.img_size, device=device)
        with torch.no_grad():
            fp32 = model(x).double()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                autocast = model(x).double()
            cast = model.bfloat16()(x.bfloat16()).double()
        results[name] = {
            "logit_max_abs": float(fp32.abs().max()),
            "autocast_max_abs_diff": float((autocast - fp32).abs().max()),
            "cast_max_abs_diff": float((cast - fp32).abs().max()),
            "autocast_top1_agreement": float((autocast.argmax(1) == fp32.argmax(1)).float().mean()),
            "cast_top1_agreement": float((cast.argmax(1) == fp32.argmax(1)).float().mean()),
        }
    return results


def _train_step(model, x: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    return loss


def _set_fused(model: torch.nn.Module, fused: bool) -> None:
    from swinv2.attention import WindowAttention

    for m in model.modules():
        if isinstance(m, WindowAttention):
            m.fused, m.cpu_kernels = fused, False


def _one_path(model, x, target, dtype, device, repeats: int) -> tuple[dict, dict]:
    """Loss, peak memory and median time of a training step on the model's current attention path; gradients."""
    model.zero_grad(set_to_none=True)
    _train_step(model, x, target, dtype)  # warm-up
    model.zero_grad(set_to_none=True)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"loss": float(_train_step(model, x, target, dtype))}
    if device.type == "cuda":
        row["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        _train_step(model, x, target, dtype)
        _sync(device)
        times.append(time.perf_counter() - start)
    row["median_step_s"] = round(sorted(times)[len(times) // 2], 4)
    return row, grads


def sdpa_vs_explicit(device: str = "cuda", name: str = "swinv2_tiny_window8_256", batch: int = 32, repeats: int = 5,
                     dtypes=("fp32", "bf16", "fp16"), **overrides) -> dict:
    """One training step per attention path and precision: loss, gradient difference, peak memory, time."""
    import swinv2

    device = torch.device(device)
    results = {}
    for dtype_name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        torch.manual_seed(0)
        model = swinv2.create_model(name, **{"num_classes": 1000, **overrides}).to(device).train()
        x = torch.randn(batch, 3, *model.img_size, device=device)
        target = torch.randint(0, model.num_classes, (batch,), device=device)
        row, grads = {}, {}
        for path in ("sdpa", "explicit"):
            _set_fused(model, path == "sdpa")
            row[path], grads[path] = _one_path(model, x, target, dtype, device, repeats)
        rel = {n: float((grads["sdpa"][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
               for n, g in grads["explicit"].items()}
        worst = max(rel, key=rel.get)
        row["max_relative_grad_diff"] = {"param": worst, "value": rel[worst]}
        results[dtype_name] = row
    return results


def sdpa_ops(run) -> list[str]:
    """The SDPA backends (names of :data:`SDPA_OPS`) whose aten op ran inside ``run()``, in first-call order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    seen = []
    for event in prof.events():
        backend = SDPA_OPS.get(event.name.removeprefix("aten::"))
        if backend and backend not in seen:
            seen.append(backend)
    return seen


def sdpa_backends(device: str = "cuda", windows: Iterable[int] = (6, 7, 8, 12, 14, 24), dim: int = 128,
                  heads: int = 4, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Per window length N = w*w: the SDPA backend of a shifted V2 block's training forward/backward and of its
    ``no_grad`` evaluation forward, with the weights cast to ``dtype`` as DeepSpeed's bf16 engine casts them (no
    autocast), and the evaluation output's largest difference to the explicit path at the same precision."""
    from swinv2.model import SwinBlock
    from swinv2.plan.fake import cast_params

    rows = {}
    for w in windows:
        torch.manual_seed(0)
        block = cast_params(SwinBlock("v2", dim, heads, (w, w), (w // 2, w // 2)), dtype).to(device)
        x = torch.randn(2, 2 * w, 3 * w, dim, device=device, dtype=dtype, requires_grad=True)
        train = sdpa_ops(lambda b=block, x=x: b(x).float().sum().backward())
        block.eval()
        with torch.no_grad():
            evaluation = sdpa_ops(lambda b=block, x=x: b(x))
            fused = block(x).double()
            block.attn.fused = False
            explicit = block(x).double()
        rows[f"N={w * w}"] = {"train": train, "eval": evaluation,
                              "eval_max_abs_diff_to_explicit": float((fused - explicit).abs().max()),
                              "output_max_abs": float(explicit.abs().max())}
    return rows


def block_memory(device: str = "cuda", dim: int = 512, heads: int = 16, window: int = 32, size: int = 384,
                 dtype: torch.dtype = torch.bfloat16) -> dict:
    """One shifted V2 block (default: SwinV2-G stage 1 at 1536 px, window 32: a 384 x 384 map of 512 channels, 16
    heads), batch 1, weights in ``dtype`` as DeepSpeed casts them, no activation checkpointing: the peak memory
    its forward + backward allocates above its weights, against the planner's count (bytes saved for backward,
    the input among them, plus the largest saved tensor once more as the backward's transient)."""
    from swinv2.flops import fake_cuda
    from swinv2.model import SwinBlock
    from swinv2.plan.activations import count_saved
    from swinv2.plan.fake import cast_params

    def build() -> SwinBlock:
        return cast_params(SwinBlock("v2", dim, heads, (window, window), (window // 2, window // 2)), dtype)

    def loss(block: SwinBlock) -> torch.Tensor:
        x = torch.randn(1, size, size, dim, dtype=dtype, requires_grad=True)
        return block(x).float().sum()

    with fake_cuda():
        saved = count_saved(build(), loss)
    device, cuda = torch.device(device), torch.device(device).type == "cuda"
    block = build().to(device)
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device) if cuda else 0  # the weights; the input counts, as it is saved
    x = torch.randn(1, size, size, dim, dtype=dtype, device=device, requires_grad=True)
    block(x).float().sum().backward()
    _sync(device)
    row = {"predicted_saved_bytes": saved.total, "predicted_largest_bytes": saved.largest,
           "predicted_peak_bytes": saved.total + saved.largest}
    if cuda:
        row["measured_peak_bytes"] = torch.cuda.max_memory_allocated(device) - start
        row["measured_over_predicted"] = round(row["measured_peak_bytes"] / row["predicted_peak_bytes"], 3)
    return row
