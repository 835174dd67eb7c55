"""What a pretraining run measures besides its training loss, so that a long run shows early whether it pays off.

- The held-out reconstruction loss on ``data.eval_urls`` (:mod:`simmim.heldout`: fixed crops, one fixed mask per
  image, every image once across ranks), with a reconstruction grid of the same first held-out images each time.
- A kNN probe (:mod:`swinv2.train.knn`) of the encoder's pooled features on labelled shards (``probe.train_urls``
  as the bank, ``probe.eval_urls`` as the queries). Masked image modelling probes poorly in absolute terms
  (SimMIM arXiv 2111.09886; MAE arXiv 2111.06377 sec. 4.3); compare it with its own value at step 0, which the
  run also measures.

They run every ``eval.every_steps`` steps, at the start of a fresh run and at the end.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from swinv2.data import build_loader
from swinv2.train.knn import knn_probe
from swinv2.train.tracking import Tracker

from .config import PretrainConfig
from .heldout import HeldOutTransform, heldout_loss
from .masking import MaskGenerator
from .model import SimMIM
from .visualize import reconstruction_grid


def gathered(params: list[torch.nn.Parameter]) -> Any:
    """ZeRO-3 partitions parameters; ones used outside a module's own forward (SimMIM's mask token in
    ``predict``) must be gathered explicitly. A no-op context otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


class PretrainMonitors:
    """The held-out loss (when ``data.eval_urls`` is set) and the kNN probe (when ``probe.*_urls`` are set)."""

    def __init__(self, cfg: PretrainConfig, mask_generator: MaskGenerator, rank: int, world: int):
        self.cfg, self.mask_generator = cfg, mask_generator
        data, size = cfg.data, cfg.model.img_size
        self.heldout = (build_loader(data, "heldout", HeldOutTransform(size), rank, world, img_size=size)
                        if data.eval_urls else None)
        self.bank = self.queries = None
        if cfg.probe.train_urls:
            self.bank = build_loader(data, "eval", rank=rank, world_size=world, urls=cfg.probe.train_urls,
                                     img_size=size, setting="probe.train_urls")
            self.queries = build_loader(data, "eval", rank=rank, world_size=world, urls=cfg.probe.eval_urls,
                                        img_size=size, setting="probe.eval_urls")

    @property
    def enabled(self) -> bool:
        return self.heldout is not None or self.bank is not None

    def due(self, step: int, last_step: int) -> bool:
        every = self.cfg.eval.every_steps
        return self.enabled and (step == last_step or bool(every and step % every == 0))

    def run(self, model: SimMIM, device: torch.device, dtype: torch.dtype, tracker: Tracker, step: int) -> dict:
        """Measure everything configured at ``step``; log to the console and wandb; return the metrics."""
        lockstep = self.cfg.deepspeed.zero_stage == 3
        metrics: dict[str, float] = {}
        parts = []
        if self.heldout is not None:
            with gathered([model.mask_token]):
                result = heldout_loss(model, self.heldout, self.mask_generator, device, lockstep,
                                      keep=self.cfg.eval.num_images)
            metrics["eval/heldout_loss"] = result.loss
            metrics["eval/heldout_loss_zero"] = result.zero_loss
            parts.append(f"held-out loss {result.loss:.4f} ({result.count} images; predicting zero "
                         f"{result.zero_loss:.4f})")
            if len(result.images):
                grid = reconstruction_grid(result.images, result.masks, result.reconstructions)
                tracker.image("heldout_reconstruction", grid, step)
        if self.bank is not None:
            knn = knn_probe(model.encoder, self.bank, self.queries, device, dtype, k=self.cfg.probe.k,
                            temperature=self.cfg.probe.temperature, lockstep=lockstep)
            metrics["eval/knn_top1"] = knn["top1"]
            parts.append(f"kNN top-1 {knn['top1']:.2f} ({knn['count']} queries, k={self.cfg.probe.k})")
        tracker.send(metrics, step)
        tracker.print(f"eval step {step}: " + ", ".join(parts))
        return metrics
