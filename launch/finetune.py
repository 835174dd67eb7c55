"""Fine-tune a Swin V2 classifier at a higher resolution and window with DeepSpeed.

    deepspeed launch/finetune.py                                   # the demo: fine-tunes runs/demo (pretrain first)
    deepspeed --num_gpus 8 launch/finetune.py --config configs/finetune/swinv2_base_192to224.yaml pretrained=...
    python launch/finetune.py --help

The same as the ``swinv2-finetune`` console command; the code is ``swinv2.commands.finetune.main``.
"""

from swinv2.commands.finetune import main

if __name__ == "__main__":
    raise SystemExit(main())
