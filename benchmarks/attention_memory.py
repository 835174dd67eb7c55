"""Peak memory of window attention computed in sequential chunks (Swin V2 sec. 3.4) vs all windows at once.

Each configuration runs in a fresh process so the process high-water mark (CPU; reported as its growth
during the forward passes) or the CUDA allocator's peak is its own. The explicit attention path is used
because it is the one that materialises the ``(windows x heads, N, N)`` attention maps (SDPA's fused
kernels already avoid it where they apply).

    python benchmarks/attention_memory.py --img 512 --chunks 0 16 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
import swinv2
img, chunk, device = int(sys.argv[1]), int(sys.argv[2]) or None, sys.argv[3]
torch.manual_seed(0)
model = swinv2.create_model("swinv2_tiny_window8_256", img_size=img, window_size=16, fused_attn=False,
                            attn_chunk_size=chunk).to(device).eval()
x = torch.randn(1, 3, img, img, device=device)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with torch.no_grad():
    model(x)
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = model(x)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
# CPU: growth of the process high-water mark over the model and input alone
peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else \
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
print(json.dumps({"chunk": chunk, "peak_mb": round(peak, 1), "seconds": round(seconds, 3),
                  "checksum": float(out.double().sum())}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img", type=int, default=512)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 16, 4], help="0 = all windows at once")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    for chunk in args.chunks:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.img), str(chunk), args.device],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    base = rows[0]["peak_mb"]
    for row in rows:
        print(f"chunk {str(row['chunk']):>4}: peak {row['peak_mb']:8.1f} MB ({row['peak_mb'] / base:.2f}x), "
              f"{row['seconds']:.2f} s, checksum {row['checksum']:.6e}")
    print(json.dumps({"img": args.img, "device": args.device, "rows": rows}))


if __name__ == "__main__":
    main()
