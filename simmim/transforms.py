"""SimMIM pretraining augmentation (arXiv 2111.09886 sec. 4.1): random resized crop, flip, ImageNet normalisation,
and a fresh mask for every sample."""

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


class PretrainTransform:
    """PIL image -> ``(image, mask)``: a normalised float tensor ``(3, H, W)`` and a mask from ``mask_generator``.

    RandomResizedCrop to ``img_size`` (scale 0.67-1, aspect ratio 3/4-4/3), horizontal flip, ImageNet mean/std
    (the SimMIM recipe). ``img_size`` is an int or ``(H, W)`` and must be the mask generator's ``input_size``.
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
                T.ToTensor(),
                T.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
            ]
        )

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.mask_generator()

    def __repr__(self) -> str:
        return f"PretrainTransform(img_size={self.img_size}, {self.mask_generator!r}, {self.transform!r})"
