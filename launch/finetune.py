"""Fine-tune a Swin V2 classifier at a higher resolution and window with DeepSpeed, evaluating every epoch.

    deepspeed launch/finetune.py                                   # the demo: fine-tunes runs/demo (pretrain first)
    deepspeed --num_gpus 8 launch/finetune.py --config configs/finetune/swinv2_base_192to224.yaml \\
        pretrained=runs/swinv2_base_192 data.train_urls=... data.eval_urls=...
    torchrun --nproc_per_node 8 launch/finetune.py --config ...    # also works, as does plain `python`

``pretrained`` is a pretraining (or fine-tuning) run directory, a DeepSpeed checkpoint folder, a consolidated
weights file, the authors' SimMIM or classification checkpoint, or a timm checkpoint; ``pretrained=`` trains
from scratch. The load report is printed and saved as ``run.output_dir/load_report.txt``; the best weights by
top-1 go to ``run.output_dir/best.safetensors`` (``best.json``, ``metrics.json`` beside them). Overrides are
``key=value`` pairs over the YAML; ``resume=false`` starts over instead of continuing from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from swinv2.data import DataError  # noqa: E402
from swinv2.finetune.config import load_finetune_config  # noqa: E402
from swinv2.finetune.run import finetune  # noqa: E402
from swinv2.finetune.weights import WeightsError  # noqa: E402
from swinv2.train.checkpoint_manager import CheckpointWriteError  # noqa: E402
from swinv2.train.config import ConfigError  # noqa: E402
from swinv2.train.safe_load import UnsafeCheckpointError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "finetune" / "demo.yaml"), help="YAML config file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_finetune_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}\n", end="", file=sys.stderr, flush=True)  # one write: ranks' lines stay whole
        return 2
    try:
        result = finetune(cfg)
    except (ConfigError, DataError, WeightsError, UnsafeCheckpointError) as error:  # fixable by the user
        print(f"error: {error}\n", end="", file=sys.stderr, flush=True)  # one write: ranks' lines stay whole
        return 2
    except CheckpointWriteError as error:  # e.g. a full disk: every rank says so and exits, none waits
        print(f"error: {error}\n", end="", file=sys.stderr, flush=True)  # one write: ranks' lines stay whole
        return 1
    return 0 if result.end.reason in ("done", "max_steps", "preempted") else 1


if __name__ == "__main__":
    sys.exit(main())
