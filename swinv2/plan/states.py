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

bf16 sums gradients in float32 whenever a step accumulates micro batches or ZeRO-2/3 keeps gradient partitions
(:func:`..engine.fp32_grad_accumulation`, DeepSpeed's ``data_types.grad_accum_dtype``). Then:

- ZeRO-1 with accumulation runs DeepSpeed's ``BF16_Optimizer`` (``engine.py`` ``_do_optimizer_sanity_check``,
  unless the optimizer is offloaded): the flat bf16 weights and the float32 partition, moments and counters as
  ZeRO-1, plus a float32 gradient buffer as large as the whole flat weights on every rank
  (``bf16_optimizer.py`` line 191, ``zeros_like(bf16_groups_flat[i], dtype=grad_acc_dtype)``; it lives on after
  the step) and, until the step, every parameter's own bf16 ``.grad`` (summed into that buffer after each backward
  pass, line 523, and freed only by the step's ``zero_grad``); the q/v bias views count as for ZeRO-0. At the
  accumulation boundary the engine all-reduces that buffer (``engine.py`` ``buffered_allreduce_fallback`` ->
  ``allreduce_no_retain``/``allreduce_bucket``): the groups go into buckets of 5e8 elements, a bucket of several
  groups is flattened into a float32 copy, and every bucket is cast to bf16 (the default communication dtype), a
  transient counted in :attr:`ModelStates.reduce_transient`.
- ZeRO-2 keeps one float32 gradient partition per group (``stage_1_and_2.py``
  ``_build_compact_grad_partition_buffer``: ``zeros(partition_size, dtype=gradient_accumulation_dtype)``) instead of
  the bf16 gradients of the parameters in its partition; freed by the step.
- ZeRO-3's flat gradient-partition buffer is float32 (``stage3.py`` ``grad_partitions_flat_buffer``).

Plus DeepSpeed's bookkeeping scalars (a step counter per optimizer group or parameter, the gradient norm).
Transient communication buffers (``reduce_bucket_size``, ZeRO-3's live parameters) are in :func:`comm_buffers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..attention import WindowAttentionV2
from ..train.config import TrainConfig
from ..train.engine import accumulation_steps, fp32_grad_accumulation
from ..train.optim import param_groups

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class ModelStates:
    """Bytes per rank (the largest over ranks where ranks differ); ``host`` is what offloading moves to CPU RAM.

    ``gradients`` are those held after a backward pass; ``kept_gradients``, the part of them that lives on after the
    optimizer step (ZeRO-3's gradient partition, the ``BF16_Optimizer``'s float32 buffer). ``reduce_transient``: the
    ``BF16_Optimizer``'s all-reduce copies at the accumulation boundary (not a model state; on top of them).
    """

    weights: int
    gradients: int
    optimizer: int
    buffers: int
    host: int = 0
    kept_gradients: int = 0
    reduce_transient: int = 0


def zero_settings(cfg: TrainConfig) -> dict:
    """DeepSpeed's resolved ZeRO settings for the config (its defaults, then the config's ``extra_json``)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.extra_json:
        import json

        with open(cfg.deepspeed.extra_json) as f:
            zero.update(json.load(f).get("zero_optimization", {}))
    return DeepSpeedZeroConfig(**zero).model_dump()


def grouped_numels(model: nn.Module, cfg: TrainConfig) -> list[list[int]]:
    """Element counts of the parameters in each optimizer group, in the order the engine receives them."""
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    return [[p.numel() for p in g["params"]] for g in groups if g["params"]]


def fp32_accumulation(cfg: TrainConfig, world: int) -> bool:
    """Whether the run sums its gradients in float32 (bf16 with accumulation or ZeRO-2/3; see the module)."""
    ds = cfg.deepspeed
    return fp32_grad_accumulation(ds.precision, ds.zero_stage,
                                  accumulation_steps(ds.global_batch, cfg.data.batch_size, world))


def uses_bf16_optimizer(cfg: TrainConfig, world: int) -> bool:
    """Whether DeepSpeed 0.19 runs ``BF16_Optimizer``: ZeRO-1 summing in float32, optimizer not offloaded
    (``engine.py`` ``_do_optimizer_sanity_check``)."""
    ds = cfg.deepspeed
    return ds.zero_stage == 1 and not ds.offload_optimizer and fp32_accumulation(cfg, world)


def refused(cfg: TrainConfig, world: int) -> bool:
    """bf16 with accumulation under ZeRO-0: the engine refuses it at start (DeepSpeed sums in fp32 only under ZeRO)."""
    return cfg.deepspeed.zero_stage == 0 and fp32_accumulation(cfg, world)


# engine.py MEMORY_OPT_ALLREDUCE_SIZE: the elements after which allreduce_no_retain reduces the bucket it has filled.
ALLREDUCE_BUCKET = 500_000_000


def allreduce_copies(flat_numels: list[int]) -> int:
    """Peak bytes of the ``BF16_Optimizer``'s boundary all-reduce of its float32 gradient groups (``engine.py``
    ``allreduce_no_retain``: groups are added to a bucket until it holds more than 5e8 elements; ``allreduce_bucket``
    flattens a bucket of several groups into one float32 copy (one group stays a view) and casts it to bf16)."""
    peak, bucket = 0, []
    for n in flat_numels:
        bucket.append(n)
        if sum(bucket) > ALLREDUCE_BUCKET:
            peak, bucket = max(peak, _bucket_copies(bucket)), []
    return max(peak, _bucket_copies(bucket)) if bucket else peak


def _bucket_copies(bucket: list[int]) -> int:
    return (4 * sum(bucket) if len(bucket) > 1 else 0) + 2 * sum(bucket)


def shared_bias_extra(model: nn.Module) -> int:
    """Elements by which ZeRO-0's gradients exceed the parameters: the unused k slice of each V2 qkv-bias buffer."""
    return sum(m.q_bias.numel() for m in model.modules() if isinstance(m, WindowAttentionV2) and m.q_bias is not None)


def model_states(model: nn.Module, cfg: TrainConfig, world: int) -> ModelStates:
    """Weights, gradients (held after the backward pass) and optimizer states per rank for ``world`` ranks."""
    ds = cfg.deepspeed
    b = BYTES[ds.precision]
    groups = grouped_numels(model, cfg)
    numels = [n for g in groups for n in g]
    P = sum(numels)
    buffers = sum(t.numel() * t.element_size() for t in model.buffers())
    mixed = ds.precision != "fp32"
    fp32_grads = fp32_accumulation(cfg, world) and ds.zero_stage > 0  # ZeRO-0 with it is refused (engine.py)
    if ds.zero_stage == 0:
        optimizer = (4 * P if mixed else 0) + 8 * P + 4 * len(numels)  # master, moments, per-parameter step
        return ModelStates(b * P, b * (P + shared_bias_extra(model)), optimizer, buffers)
    if ds.zero_stage in (1, 2):
        flat, partition, grads, flats = 0, 0, [0] * world, []
        for g in groups:
            aligned = math.ceil(sum(g) / (2 * world)) * 2 * world
            part = aligned // world
            flat, partition = flat + aligned, partition + part
            flats.append(aligned)
            offset = 0
            for n in g:  # a rank keeps the gradients of every parameter that overlaps its partition
                for r in range(world):
                    if offset < (r + 1) * part and offset + n > r * part:
                        grads[r] += n
                offset += n
        optimizer = 12 * partition + 4 * len(groups) + 4  # fp32 partition + moments, steps, gradient norm
        if uses_bf16_optimizer(cfg, world):  # same flat weights and partitions; a whole fp32 gradient copy
            kept = 4 * flat
            return ModelStates(b * flat, kept + b * (P + shared_bias_extra(model)), optimizer, buffers,
                               kept_gradients=kept, reduce_transient=allreduce_copies(flats))
        host = 0
        if ds.offload_optimizer:
            host, optimizer = optimizer + 4 * partition, 4 + 4 * len(groups)
        gradients = 4 * partition if fp32_grads else b * max(grads)
        return ModelStates(b * flat, gradients, optimizer, buffers, host)
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
    gradients = (4 if fp32_grads else b) * part
    return ModelStates(weights, gradients, optimizer, buffers, host, kept_gradients=gradients)


def comm_buffers(model_params: int, cfg: TrainConfig, world: int) -> int:
    """DeepSpeed's transient buffers during the backward pass, from its bucket settings (bytes per rank).

    ZeRO-1/2 with ``contiguous_gradients``: a gradient reduction bucket of ``reduce_bucket_size`` elements in the
    gradients' dtype (allocated whole, however small the model), doubled with ``overlap_comm``. ZeRO-3: the
    parameters it may keep gathered at once (``stage3_max_live_parameters``, at most the model; its bucket is a
    model state). ZeRO-0 reduces in the gradients' own buffers, the ``BF16_Optimizer`` (ZeRO-1 with float32
    accumulation) in its float32 buffer after the backward pass (:attr:`ModelStates.reduce_transient`).
    """
    ds = cfg.deepspeed
    if ds.zero_stage == 0 or uses_bf16_optimizer(cfg, world):
        return 0
    zero = zero_settings(cfg)
    b = BYTES[ds.precision]
    if ds.zero_stage == 3:
        return b * min(model_params, int(zero["max_live_parameters"]))
    if not zero["contiguous_gradients"]:
        return 0
    return int(zero["reduce_bucket_size"]) * b * (2 if zero["overlap_comm"] else 1)
