"""Memory and speed planner: what a training config needs per GPU, counted from first principles.

Activations are counted by running the real model forward on fake (meta) tensors, model states follow
DeepSpeed's ZeRO partitioning rules, and the step time comes from the exact FLOP count (:mod:`swinv2.flops`).
``python launch/plan.py --config CONFIG`` prints it; see docs/planner.md.
"""
