"""Will a training config fit on my GPUs, and how long will a step take?

    python launch/plan.py --config configs/simmim/swinv2_giant_192.yaml --gpu a100-40gb --gpus 128
    python launch/plan.py --paper-table
    python launch/plan.py --help

The same as the ``swinv2-plan`` console command; the code is ``simmim.commands.plan.main``.
"""

from simmim.commands.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
