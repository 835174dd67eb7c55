"""Held-out reconstruction loss: SimMIM's own objective on images it never trains on, with masks fixed per image.

A long pretraining run needs a number that compares across evaluations and runs: the training loss mixes in new
random crops and masks every step. Here every held-out image is resized and centre-cropped (no randomness) and
masked with a mask drawn from a seed derived from its sample key (SHA-256 of the key), so the same image gets
the same mask in every evaluation, on any number of ranks and workers. The loss is SimMIM's (arXiv 2111.09886
sec. 3.3) summed over all held-out images: ``sum |target - prediction| * M / (sum M * channels)``. Every image is
read exactly once across ranks (the ``"heldout"`` evaluation stream); the sums are all-reduced at the end.

Beside it, the same sum for a prediction of zero everywhere (``zero_loss``): the mean of the locally normalised
target, or for the plain target the ImageNet mean colour. A run whose held-out loss sits at that value has learnt
nothing but to predict the mean, a failure the training loss does not show (benchmarks/RESULTS.md, "Does SimMIM
pretraining pay off on the demo?").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from swinv2.train.eval_batches import lockstep_batches
from swinv2.windows import to_2tuple

from .masking import MaskGenerator
from .model import SimMIM
from .transforms import _to_rgb, normalize_images


class HeldOutTransform:
    """PIL image -> uint8 ``(3, H, W)``: shorter side resized to the crop (bilinear), then the centre crop.

    No randomness, so every evaluation sees the same pixels (the counterpart of :class:`PretrainTransform`,
    whose output contract it shares: normalise on the device with :func:`normalize_images`).
    """

    def __init__(self, img_size: int | tuple[int, int]):
        self.img_size = to_2tuple(img_size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = _to_rgb(image)
        (h, w), (W, H) = self.img_size, image.size
        scale = max(h / H, w / W)
        rw, rh = max(w, round(W * scale)), max(h, round(H * scale))
        image = image.resize((rw, rh), Image.Resampling.BILINEAR)
        left, top = (rw - w) // 2, (rh - h) // 2
        pixels = np.asarray(image.crop((left, top, left + w, top + h)))  # (H, W, 3)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"HeldOutTransform(img_size={self.img_size}, shorter side resized (bilinear), centre crop)"


def key_seed(key: str) -> int:
    """A seed that depends only on the sample key (Python's ``hash`` of a string changes between processes)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def key_masks(mask_generator: MaskGenerator, keys: list[str]) -> torch.Tensor:
    """One mask per sample key, ``(B, h, w)``, the same for that key in every call."""
    return torch.stack([mask_generator(seed=key_seed(k)) for k in keys])


@dataclass
class HeldOutResult:
    """The held-out loss, the image count over all ranks, and (on every rank) the first ``keep`` images of its
    first batch with their masks and reconstructions in the input space, for a fixed reconstruction grid."""

    loss: float
    count: int
    zero_loss: float  # the loss of predicting zero everywhere: the level of a model that learnt only the mean
    images: torch.Tensor
    masks: torch.Tensor
    reconstructions: torch.Tensor


@torch.no_grad()
def heldout_loss(model: SimMIM, loader: Any, mask_generator: MaskGenerator, device: torch.device,
                 lockstep: bool = False, keep: int = 8) -> HeldOutResult:
    """SimMIM's loss over every image of ``loader`` (a ``"heldout"`` stream of uint8 images with ``key``s).

    The images are normalised in float32 (the target's precision); the model casts the encoder's copy to its own
    dtype. ``lockstep=True`` when the forward is collective (ZeRO-3): ranks without data join with a dummy batch.
    """
    was_training = model.training
    model.eval()
    # sum |t - p| * M, sum M * channels, sum |t - 0| * M; the image count stays on the host (no copy per batch)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    count = 0
    kept: tuple[torch.Tensor, ...] = ()

    def dry_forward() -> None:
        h, w = mask_generator.input_size
        model.predict(torch.zeros(1, model.in_chans, h, w, device=device),
                      torch.zeros(1, *mask_generator.token_size, dtype=torch.long, device=device))

    try:
        for batch in lockstep_batches(loader, device, lockstep, dry_forward):
            images = normalize_images(batch["image"].to(device, non_blocking=True))
            masks = key_masks(mask_generator, batch["key"]).to(device)
            pred = model.predict(images, masks)
            error, weight = model.masked_error(images, masks, pred)
            zero_error, _ = model.masked_error(images, masks, torch.zeros_like(pred))
            sums += torch.stack([error.sum(dtype=torch.float64), weight.sum(dtype=torch.float64) * model.in_chans,
                                 zero_error.sum(dtype=torch.float64)])
            count += len(images)
            if not kept:
                n = min(keep, len(images))
                kept = (images[:n].float(), masks[:n], model.to_input_space(images[:n], pred[:n]).float())
    finally:
        model.train(was_training)
    sums = torch.cat([sums, torch.full((1,), float(count), dtype=torch.float64, device=device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    error_sum, weight_sum, zero_sum, count = sums.tolist()
    if count == 0:
        raise ValueError("the held-out set is empty on every rank: check data.eval_urls")
    if not kept:
        empty = torch.zeros(0)
        kept = (empty, empty, empty)
    return HeldOutResult(error_sum / weight_sum, int(count), zero_sum / weight_sum, *kept)
