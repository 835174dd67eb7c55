"""Fine-tuning run: pretrained weights -> classifier at the new size and window -> DeepSpeed -> step loop, with
an evaluation after every epoch and at the end (SimMIM arXiv 2111.09886 sec. 4.1; Swin V2 arXiv 2111.09883 3.3).

``launch/finetune.py`` parses the command line and calls :func:`finetune`; everything else lives here (and in
:mod:`.weights`, :mod:`.evaluate`, :mod:`.keep`) so tests reach it. The recipe is in :mod:`.finetune_config`:
layer-wise LR decay (applied once, :func:`swinv2.train.optim.param_groups`), warmup + cosine, drop path,
RandAugment and random erasing (the data stream), Mixup/CutMix with label smoothing (here), optional EMA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import build_loader
from ..files import write_text_atomic
from ..flops import ImageFlops, image_flops
from ..train.checkpoint_manager import CheckpointManager
from ..train.loop import LoopEnd
from ..train.run import TrainingRun, start_run
from ..train.tracking import Tracker
from .best_weights import BestKeeper, EmaCheckpointManager, full_state_dict
from .config import FinetuneConfig
from .evaluation import evaluate
from .weights import build_classifier, check_exists, load_pretrained, model_spec, write_model_json


@dataclass
class FinetuneResult:
    """Where the loop stopped, the last evaluation and the best one (``None`` if nothing was evaluated)."""

    end: LoopEnd
    last: dict | None
    best: dict | None


def build_mixup(cfg: FinetuneConfig) -> Any:
    """timm's Mixup/CutMix (soft targets with label smoothing folded in), or ``None`` when it is off."""
    if not cfg.mixup.enabled:
        return None
    from timm.data import Mixup

    mx = cfg.mixup
    return Mixup(mixup_alpha=mx.mixup_alpha, cutmix_alpha=mx.cutmix_alpha, prob=mx.prob, switch_prob=mx.switch_prob,
                 mode=mx.mode, label_smoothing=mx.label_smoothing, num_classes=cfg.model.num_classes)


def build_criterion(cfg: FinetuneConfig) -> nn.Module:
    """Soft-target cross-entropy after Mixup; label-smoothing (or plain) cross-entropy without it."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup.enabled:
        return SoftTargetCrossEntropy()
    if cfg.mixup.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.mixup.label_smoothing)
    return nn.CrossEntropyLoss()


def build_ema(model: nn.Module, cfg: FinetuneConfig) -> Any:
    """timm's ``ModelEmaV3`` in float32 (a bf16 average would round most updates away), or ``None``."""
    if not cfg.ema.enabled:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup, dtype=torch.float32)


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Run (or resume) fine-tuning as configured."""
    resuming = cfg.resume and CheckpointManager(Path(cfg.run.output_dir) / "checkpoints", 0, 0).complete_tags()
    if cfg.pretrained and not resuming:
        check_exists(cfg.pretrained)  # before anything is written to the output directory
    size = cfg.model.img_size
    eval_loader: Any = None
    ema: Any = None

    def streams(run: TrainingRun) -> Any:
        nonlocal eval_loader
        train_loader = build_loader(cfg.data, "train", rank=run.rank, world_size=run.world, img_size=size)
        eval_loader = build_loader(cfg.data, "eval", rank=run.rank, world_size=run.world, img_size=size)
        return train_loader

    def prepare(run: TrainingRun) -> None:
        nonlocal ema
        if run.point is None:
            _load_starting_weights(run.model, cfg, run.out, run.rank)
        ema = build_ema(run.model, cfg)  # before DeepSpeed casts the model to bf16/fp16
        if ema is not None:
            run.checkpoints = EmaCheckpointManager(run.out / "checkpoints", cfg.checkpoint.keep_last, run.rank, ema)

    def on_engine(run: TrainingRun) -> None:
        if ema is not None:
            ema.module.to(run.engine.device)

    # The same initial head on every rank: start_run seeds every rank alike before build_model.
    run = start_run(cfg, lambda run: build_classifier(cfg.model), streams, prepare, on_engine)
    engine, dtype, tracker, out, rank = run.engine, run.dtype, run.tracker, run.out, run.rank
    if rank == 0:  # like config.yaml, only once the run has started (a refused resume keeps the run's own)
        write_model_json(model_spec(cfg.model), out)
    mixup, criterion = build_mixup(cfg), build_criterion(cfg)
    keeper = BestKeeper(out, rank, resumed=run.point is not None)
    zero3 = cfg.deepspeed.zero_stage == 3
    last: dict[str, Any] = {}

    def compute_loss(batch: dict) -> torch.Tensor:
        images = batch["image"].to(engine.device, non_blocking=True)
        targets = batch["label"].to(engine.device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)  # soft targets (B, classes), smoothing included
        logits = engine(images.to(dtype))
        return criterion(logits.float(), targets)

    def update_ema(step: int, batch: dict) -> None:
        if ema is not None:
            ema.update(engine.module, step=step)

    def run_eval(epoch: float, step: int) -> None:
        last.clear()
        last.update(evaluate_and_keep(engine, ema, eval_loader, dtype, keeper, tracker, zero3, epoch, step))

    def on_epoch_end(data_epoch: int, step: int) -> None:
        every = cfg.eval.every_epochs
        if every and (data_epoch + 1) % every == 0:
            run_eval(round(step / run.epoch_steps, 3), step)

    end = run.train(compute_loss, flops=classifier_flops(cfg), on_step=update_ema, on_epoch_end=on_epoch_end)
    if end.reason != "preempted" and end.step > run.start_step and last.get("step") != end.step:  # the final one
        run_eval(round(end.step / run.epoch_steps, 3), end.step)
    tracker.print(f"stopped at step {end.step} ({end.reason}); best top-1 {keeper.best_top1:.2f} in "
                  f"{out / 'best.safetensors'}; checkpoints in {run.checkpoints.dir}")
    tracker.finish()
    return FinetuneResult(end, dict(last) or None, keeper.best)


def evaluate_and_keep(engine: Any, ema: Any, loader: Any, dtype: torch.dtype, keeper: BestKeeper, tracker: Tracker,
                      lockstep: bool, epoch: float, step: int) -> dict[str, Any]:
    """Evaluate the model (and its EMA), offer the better of the two to ``keeper``, log and return the entry."""
    metrics = evaluate(engine.module, loader, engine.device, dtype, lockstep=lockstep)
    entry = {"epoch": epoch, "step": step, **{f"eval/{k}": v for k, v in metrics.items()}}
    offers = [("model", metrics, lambda: full_state_dict(engine.module))]
    if ema is not None:
        ema_metrics = evaluate(ema.module, loader, engine.device, torch.float32)
        entry.update({f"eval_ema/{k}": v for k, v in ema_metrics.items()})
        offers.append(("ema", ema_metrics, lambda: full_state_dict(ema.module)))
    for which, m, weights in sorted(offers, key=lambda o: -o[1]["top1"]):  # the better of the two first
        if keeper.offer(m["top1"], weights, {"weights": which, "epoch": epoch, "step": step, "top5": m["top5"],
                                             "loss": m["loss"], "count": m["count"]}):
            break
    entry["eval/best_top1"] = keeper.best_top1
    keeper.record(entry)
    tracker.send({k: v for k, v in entry.items() if "/" in k}, step)
    ema_text = f", EMA top-1 {entry['eval_ema/top1']:.2f}" if ema is not None else ""
    tracker.print(f"eval epoch {epoch:g} step {step}: top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} "
                  f"loss {metrics['loss']:.4f} ({metrics['count']} images, {metrics['images_per_s']:.0f}/s)"
                  f"{ema_text}; best top-1 {keeper.best_top1:.2f}")
    return entry


def classifier_flops(cfg: FinetuneConfig) -> ImageFlops:
    """Forward FLOPs per image of the config's classifier, counted on fake tensors."""
    size = cfg.model.img_size
    return image_flops(lambda: build_classifier(cfg.model), lambda m, b: m(torch.empty(b, 3, size, size)))


def _load_starting_weights(model: nn.Module, cfg: FinetuneConfig, out: Path, rank: int) -> None:
    """Load ``cfg.pretrained`` (every rank), print and save the load report (rank 0)."""
    if not cfg.pretrained:
        text = "no pretrained weights (pretrained=): training from scratch"
    else:
        report = load_pretrained(model, cfg.pretrained)
        text = f"pretrained weights: {cfg.pretrained}\n{report}"
    if rank == 0:
        print(text, flush=True)
        write_text_atomic(out / "load_report.txt", text + "\n")
