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

from ..finetune.config import load_finetune_config
from ..train.quiet import quiet_repeated_deepspeed_notices
from . import CONFIGS, run_command


def _finetune(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIGS / "finetune" / "demo.yaml"), help="YAML config file")
    # The deepspeed launcher passes --local_rank=N; the rank comes from the environment it also sets.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    from ..finetune.run import finetune  # imports DeepSpeed: after main() quieted its repeated notice

    result = finetune(load_finetune_config(args.config, args.overrides))
    return result.end.exit_status  # 130 after Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """``swinv2-finetune`` / ``launch/finetune.py``: the exit status (2 for a user error)."""
    quiet_repeated_deepspeed_notices()
    return run_command(_finetune, argv)
