"""SimMIM pretraining augmentation (arXiv 2111.09886 sec. 4.1): random resized crop, flip, ImageNet normalisation,
and a fresh mask for every sample.

The loader's workers stop at uint8 pixels; the normalisation runs on the training device
(:func:`normalize_images`). Workers then skip a float conversion and two full passes per image, and batches are
a quarter of the size in shared memory and on the way to the GPU.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

from swinv2.data.config import IMAGENET_MEAN, IMAGENET_STD
from swinv2.windows import to_2tuple

from .masking import MaskGenerator


def _to_rgb(image: Image.Image) -> Image.Image:
    # Grey-scale, palette and RGBA files would otherwise give 1 or 4 channels.
    return image if image.mode == "RGB" else image.convert("RGB")


_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def imagenet_stats(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as float32 ``(1, 3, 1, 1)`` tensors on ``device``, built once per device.

    Built per call, ``torch.tensor(..., device="cuda")`` copies from pageable host memory, which synchronises the
    stream on every micro batch and stops the CPU from running ahead of the GPU.
    """
    device = torch.device(device)
    if device not in _STATS:
        _STATS[device] = tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device)
                               for v in (IMAGENET_MEAN, IMAGENET_STD))
    return _STATS[device]


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` pixels -> ImageNet-normalised ``dtype``, on the images' device.

    The same float32 arithmetic as torchvision's ``ToTensor`` + ``Normalize`` (divide by 255, subtract the mean,
    divide by the std), so the numbers are identical to normalising in the workers. Keep the default float32 for
    SimMIM: :class:`simmim.SimMIM` builds its target from the images as given and casts only the encoder's input.
    """
    if images.dtype != torch.uint8:
        raise TypeError(
            f"expected uint8 pixels as simmim.PretrainTransform makes them, got {images.dtype}: "
            "pass the loader's batch['image'] before any conversion"
        )
    mean, std = imagenet_stats(images.device)
    return images.to(torch.float32).div_(255.0).sub_(mean).div_(std).to(dtype)


class PretrainTransform:
    """PIL image -> ``(image, mask)``: uint8 pixels ``(3, H, W)`` and a mask from ``mask_generator``.

    RandomResizedCrop to ``img_size`` (scale 0.67-1, aspect ratio 3/4-4/3, bilinear), horizontal flip with
    probability ``hflip`` (0.5 in the SimMIM recipe; ``data.hflip``, 0 for digits or text): torchvision's algorithm
    and resampling, drawn with Python's ``random`` (which DataLoader seeds per worker) instead of one-element torch
    tensors, and flipped on the pixel array. That halves the per-image cost, which matters in a loader worker. The
    ImageNet mean/std normalisation is left to :func:`normalize_images` on the device. ``img_size`` is an int or
    ``(H, W)`` and must be the mask generator's ``input_size``.
    """

    scale = (0.67, 1.0)
    ratio = (3.0 / 4.0, 4.0 / 3.0)

    def __init__(self, img_size: int | tuple[int, int], mask_generator: MaskGenerator, hflip: float = 0.5):
        size = to_2tuple(img_size)
        if tuple(mask_generator.input_size) != size:
            raise ValueError(
                f"the mask generator is for {mask_generator.input_size[0]}x{mask_generator.input_size[1]} images but "
                f"img_size is {size[0]}x{size[1]}: build MaskGenerator(input_size={size}, ...)"
            )
        self.img_size, self.mask_generator, self.hflip = size, mask_generator, hflip

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of a random crop: torchvision's ``RandomResizedCrop.get_params``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        in_ratio = width / height  # fallback: the centre crop with the closest allowed aspect ratio
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = _to_rgb(image)
        top, left, h, w = self.crop_box(*image.size)
        image = image.crop((left, top, left + w, top + h)).resize(self.img_size[::-1], Image.Resampling.BILINEAR)
        pixels = np.asarray(image)  # (H, W, 3)
        if random.random() < self.hflip:
            pixels = pixels[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), self.mask_generator()

    def __repr__(self) -> str:
        return (
            f"PretrainTransform(img_size={self.img_size}, RandomResizedCrop(scale={self.scale}, "
            f"ratio=({self.ratio[0]:.4f}, {self.ratio[1]:.4f}), bilinear), flip p={self.hflip}, "
            f"{self.mask_generator!r})"
        )
