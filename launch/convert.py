"""Convert checkpoints: our safetensors, timm's layout, or a DeepSpeed universal checkpoint.

    python launch/convert.py runs/demo exported/ [--timm]
    python launch/convert.py runs/demo --universal
    python launch/convert.py --help

The same as the ``swinv2-convert`` console command; the code is ``swinv2.commands.convert.main``.
"""

from swinv2.commands.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
