"""SimMIM pretraining step: ours against the same SimMIM head on timm's Swin encoder (same weights), in one run.

One step = forward, L1 loss on masked pixels, backward and AdamW update, as in pretraining. Reports images/s,
peak memory and model FLOPs utilisation (MFU) from the counter the training logs use
(:mod:`swinv2.train.throughput`): model FLOPs = 3 x the forward FLOPs of the batch (``swinv2.flops``, activation
recomputation not counted) / step time / peak, the peak being the GPU's datasheet figure for the dtype or, on the
CPU, a matmul peak measured on this machine now (``--peak-tflops`` overrides it).
Each round times both sides back to back (alternating order); the ratio is the median of the per-round ratios.

    python benchmarks/pretrain_speed.py                         # the demo model (configs/demo.yaml), CPU, fp32
    python benchmarks/pretrain_speed.py --config configs/simmim/swinv2_base_192.yaml --batch 128 --dtype bf16
    python benchmarks/pretrain_speed.py ... --checkpoint-activations     # recompute blocks in backward
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import swinv2  # noqa: E402
from benchmarks.model_speed import paired_rounds, peak_memory_mb  # noqa: E402
from simmim import MaskGenerator, SimMIM  # noqa: E402
from simmim.config import PretrainConfig  # noqa: E402
from simmim.pretrain import build_simmim, simmim_flops  # noqa: E402
from swinv2.train.config import load_config  # noqa: E402
from swinv2.train.throughput import device_peak, step_flops  # noqa: E402


class TimmSimMIM(SimMIM):
    """The same mask token, decoder and loss around timm's encoder (timm has no SimMIM model of its own)."""

    def __init__(self, ours: SimMIM, timm_encoder: torch.nn.Module):
        torch.nn.Module.__init__(self)
        self.timm_encoder = timm_encoder
        self.in_chans, self.norm_target_patch_size = ours.in_chans, ours.norm_target_patch_size
        self.patch_size, self.stride = ours.patch_size, ours.stride
        self.mask_token = torch.nn.Parameter(ours.mask_token.detach().clone())
        self.decoder = copy.deepcopy(ours.decoder)

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        enc = self.timm_encoder
        x = enc.patch_embed(images)  # (B, H/4, W/4, C)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = enc.norm(enc.layers(x))
        return self.decoder(x.permute(0, 3, 1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--batch", type=int, default=None, help="default: the config's data.batch_size")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--checkpoint-activations", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak per device for MFU (default: the "
                        "GPU's datasheet figure, or measured on the CPU)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = load_config(PretrainConfig, args.config, [f"model.checkpoint_activations={args.checkpoint_activations}"])
    batch = args.batch or cfg.data.batch_size
    torch.manual_seed(0)
    ours = build_simmim(cfg)
    m = cfg.model
    arch = dict(img_size=m.img_size, window_size=m.window_size or ours.encoder.stage_windows[0][0], num_classes=0,
                drop_path_rate=m.drop_path_rate)
    arch.update({k: getattr(m, k) for k in ("embed_dim", "depths", "num_heads") if getattr(m, k) is not None})
    if cfg.model.name.startswith("swin_"):
        arch["window_size"] = m.window_size or 6
    timm_name = cfg.model.name
    if timm_name not in timm.list_models():  # e.g. swinv2_tiny_window12_192: timm's family with our shape
        enc = ours.encoder
        heads = [stage.blocks[0].attn.num_heads for stage in enc.layers]
        arch.update(embed_dim=enc.embed_dim, depths=enc.depths, num_heads=tuple(heads))
        timm_name = "swinv2_tiny_window8_256" if enc.version == "v2" else "swin_tiny_patch4_window7_224"
    timm_encoder = timm.create_model(timm_name, **arch)
    timm_encoder.load_state_dict(swinv2.export_timm_state_dict(ours.encoder))
    if args.checkpoint_activations:
        timm_encoder.set_grad_checkpointing(True)
    ref = TimmSimMIM(ours, timm_encoder)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ours, ref = ours.to(device), ref.to(device)

    masks = MaskGenerator(m.img_size, cfg.simmim.mask_patch_size, ours.patch_size, cfg.simmim.mask_ratio)
    images = torch.randn(batch, 3, m.img_size, m.img_size, device=device)
    mask = torch.stack([masks(seed=i) for i in range(batch)]).to(device)
    with torch.no_grad():
        assert torch.allclose(ours(images, mask), ref(images, mask), rtol=1e-4, atol=1e-5), "the two sides differ"

    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
                  for name, model in (("ours", ours), ("timm", ref))}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(name: str, model: torch.nn.Module) -> None:
        with autocast:
            loss = model(images, mask)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    flops = step_flops(simmim_flops(cfg), batch, accumulation=1)  # what the training logs count
    peak = device_peak(device, args.dtype, args.peak_tflops)

    times, peaks = {"ours": [], "timm": []}, {}
    for name, model in (("ours", ours), ("timm", ref)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step(name, model)
        step(name, model)
        peaks[name] = peak_memory_mb(device)
    times, ratio = paired_rounds(
        {"ours": lambda: step("ours", ours), "timm": lambda: step("timm", ref)}, args.repeats, device
    )
    result = {"config": args.config, "model": cfg.model.name, "img_size": m.img_size, "batch": batch,
              "dtype": args.dtype, "device": str(device), "checkpoint_activations": args.checkpoint_activations,
              "torch_version": torch.__version__, "timm_version": timm.__version__,
              "peak_tflops": round(peak.tflops, 3), "peak_source": peak.source,
              "model_gflops_per_step": round(flops / 1e9, 2)}
    for name in times:
        seconds = statistics.median(times[name])
        result[name] = {"img_s": round(batch / seconds, 2), "step_s": round(seconds, 4),
                        "mfu_pct": round(100 * flops / seconds / 1e12 / peak.tflops, 3),
                        "peak_mb": round(peaks[name], 1)}
    result["speed_ratio"] = round(ratio, 3)  # median of the per-round ratios
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
