"""Model states per rank under DeepSpeed ZeRO 0-3: weights, gradients, optimizer states, exactly as DeepSpeed
0.19 lays them out (ZeRO paper, Rajbhandari et al., SC 2020, sec. 5; DeepSpeed's ``stage_1_and_2.py`` and
``stage3.py``), checked tensor for tensor against real engines in ``tests/test_plan_states.py``.

- ZeRO-0: every rank holds the weights and gradients in the training precision and AdamW's two float32 moments;
  bf16/fp16 add a float32 master copy. A V2 block's q and v bias gradients are two views of one ``3C`` buffer
  (the qkv bias is ``cat(q_bias, 0, v_bias)``), so that buffer counts whole.
- ZeRO-1/2: each parameter group is flattened into one buffer padded to a multiple of ``2 x world`` elements and
  cut into ``world`` equal partitions; a rank keeps the whole flat weights, a float32 copy and the moments of its
  partition, and after the backward pass the gradients of every parameter that overlaps its partition.
- ZeRO-3: every parameter is partitioned separately (``ceil(numel / world)`` elements per rank; parameters under
  ``stage3_param_persistence_threshold`` elements also stay whole on every rank), with a float32 copy, moments
  and a gradient buffer of that partition size, and a gradient reduction bucket of ``reduce_bucket_size``
  elements allocated up front (counted in ``buffers``).

Plus DeepSpeed's bookkeeping scalars (a step counter per optimizer group or parameter, the gradient norm).
Transient communication buffers (``reduce_bucket_size``, ZeRO-3's live parameters) are in :func:`comm_buffers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...attention import WindowAttentionV2
from ..optim import param_groups

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class ModelStates:
    """Bytes per rank (the largest over ranks where ranks differ); ``host`` is what offloading moves to CPU RAM."""

    weights: int
    gradients: int
    optimizer: int
    buffers: int
    host: int = 0


def zero_settings(cfg: Any) -> dict:
    """DeepSpeed's resolved ZeRO settings for the config (its defaults, then the config's ``extra_json``)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.extra_json:
        import json

        with open(cfg.deepspeed.extra_json) as f:
            zero.update(json.load(f).get("zero_optimization", {}))
    return DeepSpeedZeroConfig(**zero).model_dump()


def grouped_numels(model: nn.Module, cfg: Any) -> list[list[int]]:
    """Element counts of the parameters in each optimizer group, in the order the engine receives them."""
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    return [[p.numel() for p in g["params"]] for g in groups if g["params"]]


def shared_bias_extra(model: nn.Module) -> int:
    """Elements by which ZeRO-0's gradients exceed the parameters: the unused k slice of each V2 qkv-bias buffer."""
    return sum(m.q_bias.numel() for m in model.modules() if isinstance(m, WindowAttentionV2) and m.q_bias is not None)


def model_states(model: nn.Module, cfg: Any, world: int) -> ModelStates:
    """Weights, gradients (held after the backward pass) and optimizer states per rank for ``world`` ranks."""
    ds = cfg.deepspeed
    b = BYTES[ds.precision]
    groups = grouped_numels(model, cfg)
    numels = [n for g in groups for n in g]
    P = sum(numels)
    buffers = sum(t.numel() * t.element_size() for t in model.buffers())
    mixed = ds.precision != "fp32"
    if ds.zero_stage == 0:
        optimizer = (4 * P if mixed else 0) + 8 * P + 4 * len(numels)  # master, moments, per-parameter step
        return ModelStates(b * P, b * (P + shared_bias_extra(model)), optimizer, buffers)
    if ds.zero_stage in (1, 2):
        flat, partition, grads = 0, 0, [0] * world
        for g in groups:
            aligned = math.ceil(sum(g) / (2 * world)) * 2 * world
            part = aligned // world
            flat, partition = flat + aligned, partition + part
            offset = 0
            for n in g:  # a rank keeps the gradients of every parameter that overlaps its partition
                for r in range(world):
                    if offset < (r + 1) * part and offset + n > r * part:
                        grads[r] += n
                offset += n
        optimizer = 12 * partition + 4 * len(groups) + 4  # fp32 partition + moments, steps, gradient norm
        host = 0
        if ds.offload_optimizer:
            host, optimizer = optimizer + 4 * partition, 4 + 4 * len(groups)
        return ModelStates(b * flat, b * max(grads), optimizer, buffers, host)
    zero = zero_settings(cfg)
    threshold = zero["param_persistence_threshold"]
    part = sum(math.ceil(n / world) for n in numels)
    # Parameters at or under the threshold stay gathered, in a buffer padded to whole partitions.
    whole = sum(math.ceil(n / world) * world for n in numels if n <= threshold)
    optimizer = 12 * part + 4 * len(groups) + 8 + 1  # fp32 partition + moments, steps, norm, inf/nan flag
    buffers += b * int(zero["reduce_bucket_size"])  # ZeRO-3 allocates its gradient reduction bucket up front
    weights, host = b * (part + whole), 0
    if ds.offload_optimizer:
        host, optimizer = optimizer + 4 * part, 9 + 4 * len(groups)
    if ds.offload_params:
        host, weights = host + b * part, b * whole
    return ModelStates(weights, b * part, optimizer, buffers, host)


def comm_buffers(model_params: int, cfg: Any) -> int:
    """DeepSpeed's transient buffers during the backward pass, from its bucket settings (bytes per rank).

    ZeRO-1/2 with ``contiguous_gradients``: a gradient reduction bucket of ``reduce_bucket_size`` elements in the
    gradients' dtype (allocated whole, however small the model), doubled with ``overlap_comm``. ZeRO-3: the
    parameters it may keep gathered at once (``stage3_max_live_parameters``, at most the model; its bucket is a
    model state). ZeRO-0 reduces in the gradients' own buffers.
    """
    ds = cfg.deepspeed
    if ds.zero_stage == 0:
        return 0
    zero = zero_settings(cfg)
    b = BYTES[ds.precision]
    if ds.zero_stage == 3:
        return b * min(model_params, int(zero["max_live_parameters"]))
    if not zero["contiguous_gradients"]:
        return 0
    return int(zero["reduce_bucket_size"]) * b * (2 if zero["overlap_comm"] else 1)
