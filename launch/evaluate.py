"""Evaluate a classifier checkpoint: top-1, top-5, loss and images/s.

    python launch/evaluate.py runs/finetune_demo/best.safetensors --data demo:val
    python launch/evaluate.py --help

The same as the ``swinv2-evaluate`` console command; the code is ``swinv2.commands.evaluate.main``.
"""

from swinv2.commands.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
