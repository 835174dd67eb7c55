"""DeepSpeed set-up: process group, the DeepSpeed config derived from ours, and the engine with our optimizer.

Also the engine-level speed and precision switches: ``run.compile`` (``torch.compile`` of the model inside the
engine), fp32 gradient accumulation for bf16 (``data_types.grad_accum_dtype``) and TF32 for fp32 runs on CUDA.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .optim import StepSchedule, param_groups


def init_distributed() -> tuple[int, int]:
    """Join (or, for a plain ``python`` run, create) the process group; returns ``(rank, world_size)``.

    Works under the ``deepspeed`` launcher, ``torchrun`` and a plain one-process ``python`` run. NCCL on GPUs,
    gloo on CPU.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(slurm_env(os.environ))
    if "RANK" not in os.environ:  # plain python: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            skip_cpu_inference_allreduce()
        try:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        except torch.distributed.DistNetworkError as error:
            if "EADDRINUSE" not in str(error):
                raise
            port = os.environ.get("MASTER_PORT")
            raise ConfigError(
                f"port {port} on {os.environ.get('MASTER_ADDR')} (the rendezvous port, MASTER_PORT) is already in "
                f"use, probably by another run: pick a free one, e.g. deepspeed --master_port {port_suggestion()} "
                "(torchrun: --master_port; srun: MASTER_PORT)") from None
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def port_suggestion() -> int:
    """A TCP port free on this machine right now (what the operating system hands out for port 0)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> tuple[Any, int]:
    """``(psutil.Process of deepspeed.launcher.launch, its parent's pid)`` if that launcher started us."""
    import psutil

    try:
        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
            return parent, parent.ppid()
    except psutil.Error:
        pass
    return None, 0


def skip_cpu_inference_allreduce() -> None:
    """Keep DeepSpeed from building and setting up its CPU shared-memory all-reduce.

    On the CPU accelerator DeepSpeed JIT-compiles that op at the first ``init_distributed`` of a machine (20-90 s,
    again whenever another ``ninja`` comes first on ``PATH``) and then gives every rank a 66 MB ``/dev/shm`` segment
    that nothing unlinks: each run leaked it until a 24 GB machine ran out of memory. Only its tensor-parallel
    inference all-reduce (``deepspeed.comm.inference_all_reduce``) uses it, and without it that call falls back to
    ``torch.distributed``; training reduces through ``torch.distributed`` either way. DeepSpeed builds the op only
    where its compatibility table allows it, so the table says no.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def slurm_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's variables from SLURM's, for ``srun python launch/pretrain.py`` (one task per GPU).

    Empty outside a multi-task SLURM step. ``MASTER_ADDR`` must come from the job script (e.g. the first host of
    ``scontrol show hostnames $SLURM_JOB_NODELIST``); ``MASTER_PORT`` defaults to 29500.
    """
    if int(environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in environ:
        return {}
    if "MASTER_ADDR" not in environ:
        raise RuntimeError(
            "running under srun with several tasks but MASTER_ADDR is not set: export MASTER_ADDR=$(scontrol show "
            "hostnames $SLURM_JOB_NODELIST | head -n1) in the job script"
        )
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"), "MASTER_PORT": environ.get("MASTER_PORT", "29500")}


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """``global = micro x accumulation x world``; anything that does not divide is an error naming the fix."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"deepspeed.global_batch={global_batch} is not a multiple of data.batch_size x world size = "
            f"{micro_batch} x {world_size} = {per_step}: change deepspeed.global_batch or data.batch_size"
        )
    return global_batch // per_step


def fp32_grad_accumulation(precision: str, zero_stage: int, accumulation: int) -> bool:
    """Whether a run keeps its accumulated gradients in fp32 (DeepSpeed ``data_types.grad_accum_dtype="fp32"``).

    bf16 has an 8-bit significand: summing micro batches' gradients (accumulation > 1), or the partitions ZeRO-2/3
    reduce into their gradient buffers, in bf16 loses the small contributions (mixed precision keeps fp32 master
    weights and accumulates in fp32: Micikevicius et al., arXiv 1710.03740 sec. 3). What DeepSpeed 0.19 does with
    the setting: ZeRO-1 switches to its ``BF16_Optimizer`` (a full fp32 gradient buffer, 4 bytes per parameter on
    every rank, and partitioned fp32 master weights); ZeRO-2 keeps its gradient partitions in fp32 (4 bytes per
    parameter / ranks); ZeRO-3 its flat gradient-partition buffer likewise. ZeRO-0 cannot do it
    (DeepSpeed raises ``NotImplementedError``), so :func:`deepspeed_config` refuses bf16 + accumulation there.
    fp16 keeps DeepSpeed's loss-scaled path unchanged; fp32 accumulates in fp32 anyway.
    """
    return precision == "bf16" and (accumulation > 1 or zero_stage >= 2)


def deepspeed_config(cfg: TrainConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for our config (values explicit: DeepSpeed resolves no ``"auto"``).

    ``load_universal``: the checkpoint to resume from is in DeepSpeed's universal format (world size changed).
    """
    ds, micro = cfg.deepspeed, cfg.data.batch_size
    accumulation = accumulation_steps(ds.global_batch, micro, world_size)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    pin = torch.cuda.is_available()
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    out = {
        "train_batch_size": ds.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        # DeepSpeed 0.19 clips at 1.0 unless told otherwise; 0 turns clipping off.
        "gradient_clipping": float(cfg.optim.clip_grad),
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {
            "enabled": ds.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": ds.fp16_initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # DeepSpeed reduces gradients across ranks in the training dtype unless told otherwise: with bf16 under
        # ZeRO-0/1 and no accumulation that sums every rank's gradients in 8 significant bits. fp32 sums in fp32
        # for twice the gradient all-reduce bytes (docs/gpu.md); a deepspeed.extra_json file with
        # {"communication_data_type": "bf16"} trades that back.
        "communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO is fine
        "steps_per_print": 2**31 - 1,  # our loop reports
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and, without a training_data loader, calls
        # torch.cuda.synchronize() around every micro batch; our loop measures throughput without syncs.
        "timers": {"throughput": {"enabled": False}},
        "checkpoint": {"load_universal": load_universal},
    }
    if fp32_grad_accumulation(ds.precision, ds.zero_stage, accumulation):
        if ds.zero_stage == 0:
            raise ConfigError(
                f"deepspeed.precision=bf16 with {accumulation} micro batches per step would accumulate gradients in "
                "bf16 (DeepSpeed sums them in fp32 only under ZeRO): set deepspeed.zero_stage=1 or 2, or make "
                "deepspeed.global_batch = data.batch_size x world size")
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    if ds.extra_json:
        with open(ds.extra_json) as f:
            out = _merge(out, json.load(f))
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over our parameter groups; DeepSpeed's CPU Adam when the optimizer state is offloaded."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(
        model, cfg.optim.weight_decay, cfg.optim.layer_decay)]
    betas, eps = tuple(cfg.optim.betas), cfg.optim.eps
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=torch.cuda.is_available() or None)


def scaled_lrs(cfg: TrainConfig) -> dict[str, float]:
    """Base, warmup and minimum LR scaled linearly by global batch / ``optim.lr_batch_reference``."""
    scale = cfg.deepspeed.global_batch / cfg.optim.lr_batch_reference
    return {"base_lr": cfg.optim.base_lr * scale, "warmup_lr": cfg.optim.warmup_lr * scale,
            "min_lr": cfg.optim.min_lr * scale}


def tf32_enabled(precision: str, tf32: bool, cuda: bool) -> bool | None:
    """The TF32 setting a run asks for: ``True``/``False`` for an fp32 run on CUDA (``run.tf32``), ``None`` (leave
    PyTorch's settings alone) for bf16/fp16 runs and on the CPU, which has no TF32. :func:`apply_tf32` sets it;
    :func:`tf32_matmuls_on` reads what PyTorch does now.

    TF32 keeps fp32's range with a 10-bit significand and runs fp32 matmuls on the tensor cores (A100: 156 against
    19.5 TFLOP/s dense); PyTorch turns it off for matmuls by default (PyTorch docs, "CUDA semantics", TensorFloat-32).
    """
    if not cuda or precision != "fp32":
        return None
    return bool(tf32)


def apply_tf32(enabled: bool | None) -> None:
    """Set PyTorch's TF32 switches for matmuls and cuDNN; ``None`` leaves them as they are.

    The ``allow_tf32`` flags, not the newer ``fp32_precision`` ones: PyTorch refuses to read the old flags after the
    new ones were set, while the new getters read the old flags correctly.
    """
    if enabled is not None:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tf32_matmuls_on() -> bool:
    """Whether fp32 matmuls on CUDA run on TF32 tensor cores now, whoever set it (``torch.backends.cuda.matmul``)."""
    matmul = torch.backends.cuda.matmul
    return (getattr(matmul, "fp32_precision", "none") == "tf32" or matmul.allow_tf32
            or torch.get_float32_matmul_precision() != "highest")


def check_compile(cfg: TrainConfig) -> None:
    """Refuse ``run.compile=true`` with ZeRO-3, before anything is built (a :class:`ConfigError`).

    DeepSpeed 0.19's ZeRO-3 gathers and releases each module's parameters in forward/backward hooks that are
    excluded from compilation, so the compiled model splits into one graph per layer, and its per-module hooks
    recompile for every module until torch's recompile limit (8) sends them, and most ``Linear`` layers, back to
    eager. Measured here on the demo model on 2 CPU ranks: the same loss curve as eager, but the first step took
    232 s against 0.35 s, with every layer still a separate graph, so nothing is gained. (DeepSpeed's
    "DeepCompile", ``compile.deepcompile`` in its config, rewrites ZeRO-3 inside the graph instead; it needs its
    CUDA ops and is not used here.)
    """
    if cfg.run.compile and cfg.deepspeed.zero_stage == 3:
        raise ConfigError(
            "run.compile=true does not work with deepspeed.zero_stage=3 (DeepSpeed's ZeRO-3 parameter hooks split "
            "the compiled model into one graph per layer and most layers fall back to eager): use "
            "deepspeed.zero_stage 1 or 2 with run.compile=true, or run.compile=false with ZeRO-3")


def compile_engine(engine: Any) -> None:
    """``torch.compile`` the model inside ``engine`` in place (DeepSpeed's ``engine.compile()``, which calls
    ``nn.Module.compile``): ``engine.module`` stays the same module with the same ``state_dict`` keys, so checkpoints,
    consolidation and everything that calls ``engine.module`` are unchanged; its ``forward`` runs compiled (PyTorch
    docs, ``torch.compile`` and ``nn.Module.compile``; DeepSpeed docs, "torch.compile" support in the engine).

    Not ``fullgraph``: DeepSpeed's own forward pre- and post-hooks on the module (measured with its throughput timer
    on, which calls ``time.time``) break the graph; the model's forward between them is one graph (it compiles with
    ``fullgraph=True`` on its own, tests/test_compile.py). The first step compiles (inductor: minutes for a large
    model on a GPU); a module put in eval mode (held-out monitors, evaluation) compiles once more.
    """
    engine.compile()


def build_engine(model: nn.Module, cfg: TrainConfig, world_size: int, steps_per_epoch: int,
                 load_universal: bool = False) -> Any:
    """The DeepSpeed engine around ``model`` with our optimizer and per-step schedule (resumed with it), its model
    compiled when ``run.compile`` is set, TF32 on for fp32 runs on CUDA unless ``run.tf32=false``."""
    import deepspeed

    check_compile(cfg)
    apply_tf32(tf32_enabled(cfg.deepspeed.precision, cfg.run.tf32, torch.cuda.is_available()))
    sc = cfg.schedule
    lrs = scaled_lrs(cfg)
    optimizer = build_optimizer(model, cfg, lrs["base_lr"])
    schedule = StepSchedule(
        optimizer,
        total_steps=max(1, round(sc.epochs * steps_per_epoch)),
        warmup_steps=round(sc.warmup_epochs * steps_per_epoch),
        kind=sc.kind,
        milestones=[round(m * steps_per_epoch) for m in sc.milestones],
        gamma=sc.gamma,
        **lrs,
    )
    config = deepspeed_config(cfg, world_size, load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    if cfg.run.compile:
        compile_engine(engine)
    return engine
