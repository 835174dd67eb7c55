"""SimMIM pretraining augmentation (arXiv 2111.09886 sec. 4.1): random resized crop, flip, ImageNet normalisation,
and a fresh mask for every sample.

The loader's workers stop at uint8 pixels; the normalisation runs on the training device
(:func:`normalize_images`). Workers then skip a float conversion and two full passes per image, and batches are
a quarter of the size in shared memory and on the way to the GPU.
"""

from __future__ import annotations

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

from swinv2.windows import to_2tuple

from .masking import MaskGenerator


def _to_rgb(image: Image.Image) -> Image.Image:
    # Grey-scale, palette and RGBA files would otherwise give 1 or 4 channels.
    return image if image.mode == "RGB" else image.convert("RGB")


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` pixels -> ImageNet-normalised ``dtype``, on the images' device.

    The same float32 arithmetic as torchvision's ``ToTensor`` + ``Normalize`` (divide by 255, subtract the mean,
    divide by the std), so the numbers are identical to normalising in the workers.
    """
    if images.dtype != torch.uint8:
        raise TypeError(
            f"expected uint8 pixels as simmim.PretrainTransform makes them, got {images.dtype}: "
            "pass the loader's batch['image'] before any conversion"
        )
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    return images.to(torch.float32).div_(255.0).sub_(mean).div_(std).to(dtype)


class PretrainTransform:
    """PIL image -> ``(image, mask)``: uint8 pixels ``(3, H, W)`` and a mask from ``mask_generator``.

    RandomResizedCrop to ``img_size`` (scale 0.67-1, aspect ratio 3/4-4/3), horizontal flip (the SimMIM recipe).
    The ImageNet mean/std normalisation is left to :func:`normalize_images` on the device. ``img_size`` is an
    int or ``(H, W)`` and must be the mask generator's ``input_size``.
    """

    def __init__(self, img_size: int | tuple[int, int], mask_generator: MaskGenerator):
        size = to_2tuple(img_size)
        if tuple(mask_generator.input_size) != size:
            raise ValueError(
                f"the mask generator is for {mask_generator.input_size[0]}x{mask_generator.input_size[1]} images but "
                f"img_size is {size[0]}x{size[1]}: build MaskGenerator(input_size={size}, ...)"
            )
        self.img_size, self.mask_generator = size, mask_generator
        self.transform = T.Compose(
            [
                T.Lambda(_to_rgb),
                T.RandomResizedCrop(size, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
                T.RandomHorizontalFlip(),
                T.PILToTensor(),
            ]
        )

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.mask_generator()

    def __repr__(self) -> str:
        return f"PretrainTransform(img_size={self.img_size}, {self.mask_generator!r}, {self.transform!r})"
