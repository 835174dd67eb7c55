"""SimMIM pretraining of a Swin V1/V2 encoder with DeepSpeed.

    deepspeed launch/pretrain.py                                   # the demo: tiny SwinV2, built-in data, CPU ok
    deepspeed --num_gpus 8 launch/pretrain.py --config configs/simmim/swinv2_base_192.yaml data.train_urls=...
    python launch/pretrain.py --help

The same as the ``swinv2-pretrain`` console command; the code is ``simmim.commands.pretrain.main``.
"""

from simmim.commands.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())
