"""SimMIM pretraining of a Swin V1/V2 encoder with DeepSpeed.

    deepspeed launch/pretrain.py                                   # the demo: tiny SwinV2, built-in data, CPU ok
    deepspeed --num_gpus 8 launch/pretrain.py --config configs/simmim/swinv2_base_192.yaml data.train_urls=...
    torchrun --nproc_per_node 8 launch/pretrain.py --config ...    # also works, as does plain `python`

Overrides are ``key=value`` pairs over the YAML (e.g. ``run.output_dir=runs/b192 optim.base_lr=2e-4``);
``resume=false`` starts over instead of continuing from the newest checkpoint in ``run.output_dir``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from simmim.config import PretrainConfig  # noqa: E402
from simmim.pretrain import pretrain  # noqa: E402
from swinv2.data import DataError  # noqa: E402
from swinv2.train.checkpoint_manager import CheckpointWriteError  # noqa: E402
from swinv2.train.config import ConfigError, load_config  # noqa: E402
from swinv2.train.safe_load import UnsafeCheckpointError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="YAML config file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        end = pretrain(cfg)  # raises ConfigError too, for checks that need the world size or the checkpoint
    except (ConfigError, DataError, UnsafeCheckpointError) as error:  # the user can fix these
        print(f"error: {error}\n", end="", file=sys.stderr, flush=True)  # one write: ranks' lines stay whole
        return 2
    except CheckpointWriteError as error:  # e.g. a full disk: every rank says so and exits, none waits
        print(f"error: {error}\n", end="", file=sys.stderr, flush=True)  # one write: ranks' lines stay whole
        return 1
    return 0 if end.reason in ("done", "max_steps", "preempted") else 1


if __name__ == "__main__":
    sys.exit(main())
