"""How often does the demo pretraining stay at the loss of predicting zero?

SimMIM with the locally normalised target (arXiv 2111.09886, section 3.4) has a plateau: predicting zero for every
masked pixel is the target's mean, and a run that never leaves it has learnt nothing (benchmarks/RESULTS.md, "Does
SimMIM pretraining pay off on the demo?"). Whether a run escapes depends on float rounding, so the same config and
seed can escape with one thread count and not with another. This runs ``launch/pretrain.py`` for every
(seed, threads) pair given, reads the held-out loss and the zero-prediction level from its evaluation lines, and
counts the runs whose final held-out loss is not at least ``--margin`` below that level.

    python benchmarks/simmim_collapse_rate.py --seeds 5 6 7 8 9 10 11 12 --threads 1 --jobs 2
    python benchmarks/simmim_collapse_rate.py --seeds 0 1 2 --threads 2 --jobs 1 --pretrain optim.base_lr=2e-3
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.simmim_vs_scratch import launch  # noqa: E402

HELDOUT = re.compile(r"^eval step (\d+): held-out loss (\S+) \(\d+ images; predicting zero (\S+)\)"
                     r"(?:, kNN top-1 (\S+))?")


def pretrain(config: str, seed: int, threads: int, overrides: list[str], out: Path) -> list[tuple[int, float, float,
                                                                                                  float | None]]:
    """One demo pretraining; its evaluations as ``[(step, held-out loss, zero level, kNN top-1)]``."""
    stdout = launch("pretrain.py", ["--config", config, f"run.output_dir={out / f's{seed}_t{threads}'}",
                                    f"run.seed={seed}", "run.image_every=0", "resume=false", "wandb.mode=disabled",
                                    *overrides], out / f"s{seed}_t{threads}.log", threads)
    return [(int(m[1]), float(m[2]), float(m[3]), float(m[4]) if m[4] else None)
            for line in stdout.splitlines() if (m := HELDOUT.match(line))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--pretrain", nargs="*", default=[], metavar="key=value", help="pretraining overrides")
    parser.add_argument("--margin", type=float, default=0.01, help="escaped = final held-out < zero level - margin")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/collapse_rate")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def one(job: tuple[int, int]) -> tuple[int, int, list]:
        seed, threads = job
        evals = pretrain(args.config, seed, threads, args.pretrain, out)
        trace = ", ".join(f"{step}: {loss:.4f}" for step, loss, _, _ in evals)
        print(f"seed {seed}, {threads} threads: {trace} (zero {evals[-1][2]:.4f}; kNN {evals[-1][3]}) "
              f"[{time.time() - start:.0f} s]", flush=True)
        return seed, threads, evals

    jobs = [(seed, threads) for threads in args.threads for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, jobs))
    collapsed = [(s, t) for s, t, evals in rows if evals[-1][1] >= evals[-1][2] - args.margin]
    print(f"\n{len(collapsed)} of {len(rows)} runs ended within {args.margin} of the zero-prediction loss"
          f"{': ' + ', '.join(f'seed {s} ({t} threads)' for s, t in collapsed) if collapsed else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
