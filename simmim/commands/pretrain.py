"""SimMIM pretraining of a Swin V1/V2 encoder with DeepSpeed.

    deepspeed launch/pretrain.py                                   # the demo: tiny SwinV2, built-in data, CPU ok
    deepspeed --num_gpus 8 launch/pretrain.py --config configs/simmim/swinv2_base_192.yaml data.train_urls=...
    torchrun --nproc_per_node 8 launch/pretrain.py --config ...    # also works, as does plain `python`

Overrides are ``key=value`` pairs over the YAML (e.g. ``run.output_dir=runs/b192 optim.base_lr=2e-4``);
``resume=false`` starts over instead of continuing from the newest checkpoint in ``run.output_dir``.
"""

from __future__ import annotations

import argparse

from swinv2.commands import CONFIGS, run_command
from swinv2.train.config import load_config
from swinv2.train.quiet import quiet_repeated_deepspeed_notices

from ..config import PretrainConfig


def _pretrain(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIGS / "demo.yaml"), help="YAML config file")
    # The deepspeed launcher passes --local_rank=N; the rank comes from the environment it also sets.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    from ..pretrain import pretrain  # imports DeepSpeed: after main() quieted its repeated notice

    end = pretrain(cfg)  # raises ConfigError too, for checks that need the world size or the checkpoint
    return end.exit_status  # 130 after Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """``swinv2-pretrain`` / ``launch/pretrain.py``: the exit status (2 for a user error)."""
    quiet_repeated_deepspeed_notices()
    return run_command(_pretrain, argv)
