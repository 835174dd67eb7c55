"""Does SimMIM pretraining pay off? Pretrain, then fine-tune from the pretraining and from scratch with the same
recipe, over several seeds and the same small LR sweep for both arms; the better LR of each arm counts.

    python benchmarks/simmim_vs_scratch.py           # the demo: configs/demo.yaml, then configs/finetune/demo.yaml
    python benchmarks/simmim_vs_scratch.py --seeds 0 1 2 --lrs 1e-3 2e-3 4e-3 --jobs 2

Every run goes through the real launchers (``launch/pretrain.py``, ``launch/finetune.py``), one process each,
``--jobs`` at a time with one thread each. Each seed pretrains its own encoder (``run.seed``) and fine-tunes both
arms with that seed, so the spread covers pretraining and fine-tuning noise. A finished pretraining already in
``--out`` is reused (the launcher resumes it and finds nothing left to do); fine-tunes start over unless
``--keep-finished``. Prints
every run, then mean, standard deviation and range of the final top-1 per arm at its best LR, and writes
``results.json`` and ``top1.png`` (top-1 against fine-tuning steps, both arms, mean over seeds with the range
shaded) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL = re.compile(r"^eval epoch \S+ step (\d+): top-1 (\S+) .*?(?:EMA top-1 (\S+);)?")
ARMS = ("pretrained", "scratch")


def launch(script: str, args: list[str], log: Path, threads: int = 1) -> str:
    """Run ``launch/<script>`` in one process with ``threads`` threads; its output is kept in ``log``."""
    # The venv's bin first: the same ninja for DeepSpeed's op build in every process (see tests/conftest.py).
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed (rc {result.returncode}); see {log}")
    return result.stdout


def curve(stdout: str) -> list[tuple[int, float]]:
    """``[(step, top-1)]`` of the fine-tuned weights (not the EMA) at every evaluation."""
    return [(int(m[1]), float(m[2])) for line in stdout.splitlines() if (m := EVAL.match(line))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-config", default="configs/demo.yaml")
    parser.add_argument("--finetune-config", default="configs/finetune/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3], help="fine-tuning optim.base_lr")
    parser.add_argument("--pretrain", nargs="*", default=[], metavar="key=value", help="pretraining overrides")
    parser.add_argument("--finetune", nargs="*", default=[], metavar="key=value", help="fine-tuning overrides")
    parser.add_argument("--shared-pretraining", action="store_true",
                        help="one pretraining (the first seed's) for every fine-tuning seed: the spread then covers "
                             "fine-tuning noise only")
    parser.add_argument("--keep-finished", action="store_true",
                        help="reuse a fine-tune whose log in --out says it finished (e.g. after widening --lrs)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/simmim_vs_scratch")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = ["wandb.mode=disabled"]
    start = time.time()

    def pretrain(seed: int) -> Path:
        folder = out / f"pretrain_s{seed}"
        launch("pretrain.py", ["--config", args.pretrain_config, f"run.output_dir={folder}", f"run.seed={seed}",
                               "run.image_every=0", *quiet, *args.pretrain], out / f"pretrain_s{seed}.log")
        print(f"pretrained seed {seed} ({time.time() - start:.0f} s)", flush=True)
        return folder

    def finetune(job: tuple[str, int, float]) -> dict:
        arm, seed, lr = job
        name = f"{arm}_s{seed}_lr{lr:g}"
        source = args.seeds[0] if args.shared_pretraining else seed
        weights = str(out / f"pretrain_s{source}") if arm == "pretrained" else "''"
        log = out / f"{name}.log"
        if args.keep_finished and log.is_file() and re.search(r"^stopped at step \d+ \(done\)", log.read_text(), re.M):
            stdout = log.read_text()  # the same command finished before: its log is its result
        else:
            stdout = launch("finetune.py", ["--config", args.finetune_config, f"pretrained={weights}",
                                            f"run.output_dir={out / name}", f"run.seed={seed}", f"optim.base_lr={lr}",
                                            "checkpoint.keep_last=1", "resume=false", *quiet, *args.finetune],
                            out / f"{name}.log")
        points = curve(stdout)
        if not points:
            raise RuntimeError(f"no evaluation lines in {out / name}.log")
        row = {"arm": arm, "seed": seed, "lr": lr, "curve": points, "final": points[-1][1],
               "best": max(t for _, t in points)}
        print(f"{name}: final top-1 {row['final']:.2f}, best {row['best']:.2f} ({time.time() - start:.0f} s)",
              flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(pretrain, args.seeds[:1] if args.shared_pretraining else args.seeds))
        jobs = [(arm, seed, lr) for seed in args.seeds for lr in args.lrs for arm in ARMS]
        rows = list(pool.map(finetune, jobs))

    summary = {}
    for arm in ARMS:
        by_lr = {lr: [r["final"] for r in rows if r["arm"] == arm and r["lr"] == lr] for lr in args.lrs}
        lr = max(args.lrs, key=lambda x: statistics.mean(by_lr[x]))
        finals = by_lr[lr]
        summary[arm] = {"lr": lr, "finals": finals, "mean": statistics.mean(finals),
                        "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                        "min": min(finals), "max": max(finals),
                        "by_lr": {f"{x:g}": statistics.mean(v) for x, v in by_lr.items()}}
    pre, scr = summary["pretrained"], summary["scratch"]
    margin = pre["mean"] - scr["mean"]
    spread = max(pre["max"] - pre["min"], scr["max"] - scr["min"])
    print(f"\nfinal top-1 at each arm's best fine-tuning LR, {len(args.seeds)} seeds ({time.time() - start:.0f} s):")
    for arm in ARMS:
        s = summary[arm]
        lrs = ", ".join(f"{k}: {v:.1f}" for k, v in s["by_lr"].items())
        print(f"  {arm:10s} LR {s['lr']:g}: {s['mean']:.1f} +- {s['std']:.1f} (range {s['min']:.1f}-{s['max']:.1f});"
              f" mean by LR {lrs}")
    verdict = "pays off" if margin > spread else "does not pay off"
    print(f"  margin {margin:+.1f} points against a seed spread (largest range) of {spread:.1f}: pretraining {verdict}")
    (out / "results.json").write_text(json.dumps({"summary": summary, "margin": margin, "spread": spread,
                                                  "runs": rows, "args": vars(args)}, indent=1) + "\n")
    plot(rows, summary, out / "top1.png")
    print(f"results in {out / 'results.json'}, plot in {out / 'top1.png'}")
    return 0


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    """Top-1 against fine-tuning steps for both arms at their best LR: mean over seeds, range shaded (PIL only)."""
    from PIL import Image, ImageDraw

    width, height, left, bottom, top, right = 720, 440, 60, 50, 30, 150
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    series = {}
    for arm in ARMS:
        chosen = [r["curve"] for r in rows if r["arm"] == arm and r["lr"] == summary[arm]["lr"]]
        steps = [s for s, _ in chosen[0]]
        values = [[c[i][1] for c in chosen if i < len(c)] for i in range(len(steps))]
        series[arm] = (steps, values)
    max_step = max(max(steps) for steps, _ in series.values())

    def xy(step: float, top1: float) -> tuple[float, float]:
        return (left + (width - left - right) * step / max_step,
                height - bottom - (height - top - bottom) * top1 / 100)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick in range(0, 101, 20):
        y = xy(0, tick)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((left - 30, y - 6), str(tick), fill="black")
    for i in range(5):
        step = max_step * i / 4
        x = xy(step, 0)[0]
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{step:.0f}", fill="black")
    draw.text((left + 150, height - 20), "fine-tuning step", fill="black")
    draw.text((8, 8), "top-1 (%) on the validation set; mean over seeds, range shaded", fill="black")
    colours = {"pretrained": ((214, 39, 40), (244, 190, 190)), "scratch": ((31, 119, 180), (180, 210, 235))}
    for arm, (steps, values) in series.items():
        line, band = colours[arm]
        low = [xy(s, min(v)) for s, v in zip(steps, values, strict=True)]
        high = [xy(s, max(v)) for s, v in zip(steps, values, strict=True)]
        if len(steps) > 1:
            draw.polygon(low + high[::-1], fill=band)
    for arm, (steps, values) in series.items():
        line, _ = colours[arm]
        mean = [xy(s, statistics.mean(v)) for s, v in zip(steps, values, strict=True)]
        draw.line(mean, fill=line, width=3)
        y = top + 20 + 20 * ARMS.index(arm)
        draw.line([width - right + 10, y, width - right + 30, y], fill=line, width=3)
        draw.text((width - right + 35, y - 6), f"{arm} (LR {summary[arm]['lr']:g})", fill="black")
    image.save(path)


if __name__ == "__main__":
    sys.exit(main())
