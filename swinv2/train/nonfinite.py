"""Non-finite losses in the step loop: watched on the device, agreed on by the ranks at sync steps, and handled as
``run.on_nonfinite`` says (``stop``, ``skip`` or ``rollback``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint_manager import CheckpointManager
from .config import ConfigError, RunConfig


class LossWatch:
    """This rank's losses and non-finite steps since the ranks last agreed, kept on the device.

    Per micro batch only device ops run (no host read): the finite losses are summed, and the loss returned for the
    backward is multiplied by 1 (finite) or NaN (not), so a non-finite loss always makes the gradients non-finite.
    DeepSpeed then drops that update on every rank: the gradients are averaged across ranks before its overflow
    check, whose result it all-reduces (``engine.skipped_steps`` counts it). Multiplying by exactly 1 leaves the
    loss and its gradients bit for bit as they were.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset_losses()
        self.reset_flags()

    def reset_losses(self) -> None:
        """Start a new loss window (after a report or a rollback)."""
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=self.device)

    def reset_flags(self) -> None:
        """Forget the non-finite steps the ranks have just agreed on."""
        self.step_bad = torch.zeros((), dtype=torch.bool, device=self.device)  # the step in progress
        self.bad_steps: list[torch.Tensor] = []  # one flag per step since the last agreement
        self.first_bad = torch.zeros((), dtype=torch.float64, device=self.device)  # its step number (0: none)
        self.first_value = torch.zeros((), dtype=torch.float64, device=self.device)  # and its loss

    def micro_batch(self, loss: torch.Tensor) -> torch.Tensor:
        """Record one micro batch's loss; returns the loss to run the backward on (gated, see the class)."""
        value = loss.detach().double()
        finite = torch.isfinite(value)
        self.loss_sum += torch.where(finite, value, 0.0)
        self.loss_count += finite
        first = ~finite & ~self.step_bad & (self.first_bad == 0)
        self.first_value = torch.where(first, value, self.first_value)
        self.step_bad = self.step_bad | ~finite
        gate = torch.where(finite, torch.ones_like(loss), torch.full_like(loss, float("nan")))
        return loss * gate

    def end_step(self, step: int) -> None:
        """Close optimizer step ``step``: its non-finite flag joins those the ranks agree on next."""
        self.first_bad = torch.where(self.step_bad & (self.first_bad == 0), float(step), self.first_bad)
        self.bad_steps.append(self.step_bad)
        self.step_bad = torch.zeros((), dtype=torch.bool, device=self.device)


@dataclass
class Agreement:
    """What all ranks agree on at a sync step (one blocking all-reduce)."""

    preempted: bool
    loss_sum: float
    loss_count: float
    skipped_samples: float
    bad_steps: int  # steps since the last agreement with a non-finite loss on some rank
    bad_flags: tuple[bool, ...]  # those steps in order, True where some rank's loss was non-finite
    first_bad: int  # the first of them (0: none), the rank that saw it and its loss there
    first_rank: int
    first_value: float

    @property
    def loss(self) -> float:
        """The mean finite loss of the window (NaN if it had none)."""
        return self.loss_sum / self.loss_count if self.loss_count else float("nan")


def agree(watch: LossWatch, stopping: bool, skipped_samples: float, rank: int, world: int) -> Agreement:
    """One all-reduce (sum) of this rank's preemption flag, loss window and non-finite steps; then a host read."""
    host = torch.tensor([float(stopping), skipped_samples], dtype=torch.float64)
    per_rank = torch.zeros(2 * world, dtype=torch.float64, device=watch.device)
    per_rank[rank] = watch.first_bad  # each rank its own slot, so the sum keeps every rank's value
    per_rank[world + rank] = watch.first_value
    flags = torch.stack(watch.bad_steps).double() if watch.bad_steps else per_rank.new_zeros(0)
    vector = torch.cat([host.to(watch.device), watch.loss_sum[None], watch.loss_count[None], flags, per_rank])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(vector)
    values = vector.tolist()
    n = len(watch.bad_steps)
    firsts = values[4 + n: 4 + n + world]
    bad_ranks = [r for r in range(world) if firsts[r] > 0]
    first_rank = min(bad_ranks, key=lambda r: firsts[r]) if bad_ranks else 0
    bad_flags = tuple(f > 0 for f in values[4: 4 + n])
    return Agreement(
        preempted=values[0] > 0, skipped_samples=values[1], loss_sum=values[2], loss_count=values[3],
        bad_steps=sum(bad_flags), bad_flags=bad_flags, first_bad=int(firsts[first_rank]),
        first_rank=first_rank, first_value=values[4 + n + world + first_rank],
    )


def drops_nonfinite_updates(engine: Any) -> bool:
    """Whether DeepSpeed's optimizer skips a step whose gradients are not finite (what ``skip`` relies on).

    fp16 (loss scaler), bf16 with ``bf16.check_grad_overflow`` (DeepSpeed's default) and ZeRO 1-3 in fp32 (a
    non-finite gradient norm) do; fp32 without ZeRO runs the plain torch optimizer, which applies anything.
    """
    optimizer = engine.optimizer
    if not hasattr(optimizer, "overflow"):
        return False
    if getattr(optimizer, "check_grad_overflow", True):
        return True
    return bool(getattr(optimizer, "compute_grad_norm", False)) and getattr(optimizer, "dtype", None) != torch.bfloat16


class NonFiniteLossError(ConfigError, FloatingPointError):
    """The run stops on a non-finite loss (one sentence, exit 2 like every error the settings cause); still a
    ``FloatingPointError`` for callers that catch that."""


def remedy(engine: Any) -> str:
    """What to change, for this engine: clipping is only advised lower when it is on, bf16 only for fp16 runs."""
    clip = float(engine.gradient_clipping() or 0)
    fix = f"lower optim.base_lr or optim.clip_grad (now {clip:g})" if clip > 0 else \
        "lower optim.base_lr or turn gradient clipping on (optim.clip_grad=1.0; it is off)"
    return fix + (", or use bf16 instead of fp16" if engine.fp16_enabled() else "")


def nonfinite_message(agreed: Agreement, engine: Any, why: str = "") -> str:
    """The one sentence a run that stops on a non-finite loss ends with (``why``: the rollbacks' part)."""
    return (f"the loss became non-finite at step {agreed.first_bad} (last value {agreed.first_value:.4g} on rank "
            f"{agreed.first_rank}){why}: {remedy(engine)}; the last checkpoint is intact")


@dataclass
class NonFiniteHandler:
    """Acts on the non-finite steps the ranks agreed on, as ``run.on_nonfinite`` says, and counts them.

    ``stop`` raises :class:`NonFiniteLossError` naming the first bad step; ``skip`` counts the steps, whose updates
    DeepSpeed dropped on every rank, and stops as ``stop`` after ``run.max_consecutive_skips`` in a row (a run that
    diverged for good would otherwise skip to the end and keep weights of long ago); ``rollback`` loads the last
    complete checkpoint, at most ``run.max_rollbacks`` times, then stops as ``stop``.
    """

    run: RunConfig
    checkpoints: CheckpointManager
    world: int
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("train/nonfinite_steps", "train/nonfinite_skipped", "train/rollbacks"), 0))
    consecutive: int = 0  # skipped steps in a row, up to the last step the ranks agreed on

    def check_engine(self, engine: Any) -> None:
        """Refuse ``skip`` on an engine that would apply a non-finite update (a :class:`ConfigError`)."""
        if self.run.on_nonfinite == "skip" and not drops_nonfinite_updates(engine):
            raise ConfigError(
                "run.on_nonfinite=skip needs DeepSpeed to drop updates with non-finite gradients, which fp32 without "
                "ZeRO and bf16 with check_grad_overflow off do not: set deepspeed.zero_stage to 1 or more (and "
                "leave bf16.check_grad_overflow on), or use run.on_nonfinite=rollback")

    def handle(self, agreed: Agreement, engine: Any, step: int, data_epoch: int, tracker: Any) -> int | None:
        """Handle ``agreed`` at sync step ``step``; returns the step rolled back to, else None (go on)."""
        for bad in agreed.bad_flags:
            self.consecutive = self.consecutive + 1 if bad else 0
        if not agreed.bad_steps:
            return None
        self.counts["train/nonfinite_steps"] += agreed.bad_steps
        if self.run.on_nonfinite == "stop":
            raise NonFiniteLossError(nonfinite_message(agreed, engine))
        if self.run.on_nonfinite == "skip":
            return self._skip(agreed, engine, step, tracker)
        return self._roll_back(agreed, engine, step, data_epoch, tracker)

    def _skip(self, agreed: Agreement, engine: Any, step: int, tracker: Any) -> None:
        limit = self.run.max_consecutive_skips
        if limit and self.consecutive >= limit:
            raise NonFiniteLossError(
                f"the loss was non-finite in all {self.consecutive} steps from {step - self.consecutive + 1} to "
                f"{step} (run.max_consecutive_skips={limit}), so the run has diverged: {remedy(engine)}, and resume "
                "from the last checkpoint, which is intact")
        self.counts["train/nonfinite_skipped"] += agreed.bad_steps
        tracker.print(
            f"non-finite loss in {agreed.bad_steps} step(s) up to step {step}, the first at step "
            f"{agreed.first_bad} (value {agreed.first_value:.4g} on rank {agreed.first_rank}): their updates "
            f"were skipped on every rank ({self.counts['train/nonfinite_skipped']} skipped so far)")
        tracker.send(dict(self.counts), step)
        return None

    def _roll_back(self, agreed: Agreement, engine: Any, step: int, data_epoch: int, tracker: Any) -> int:
        point = self.checkpoints.resume_point(self.world)
        used, limit = self.counts["train/rollbacks"], self.run.max_rollbacks
        if used >= limit or point is None:
            why = (f" and {used} rollback(s) used up run.max_rollbacks={limit}" if point is not None else
                   " before the first checkpoint, so there is nothing to roll back to")
            raise NonFiniteLossError(nonfinite_message(agreed, engine, why))
        self.counts["train/rollbacks"] += 1
        tracker.print(
            f"non-finite loss at step {agreed.first_bad} (value {agreed.first_value:.4g} on rank "
            f"{agreed.first_rank}): rolling back to {self.checkpoints.dir / point.tag} (step {point.step}) and going "
            f"on with data epoch {data_epoch + 1} (rollback {self.counts['train/rollbacks']} of at most "
            f"{self.run.max_rollbacks})")
        tracker.send(dict(self.counts), step)
        back_to = self.checkpoints.load(engine, point).get("step", point.step)
        self.consecutive = 0
        tracker.rolled_back(step, back_to)
        return back_to
