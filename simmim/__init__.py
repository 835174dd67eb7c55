"""SimMIM masked image modelling on Swin V1/V2 backbones (arXiv 2111.09886): masks, model and loss, checkpoints,
pretraining transform and reconstruction grids. Depends on :mod:`swinv2`, never the reverse."""

from __future__ import annotations

from .checkpoints import export_encoder, load_checkpoint
from .masking import MaskGenerator
from .model import SimMIM
from .transforms import PretrainTransform, normalize_images
from .visualize import reconstruction_grid

__all__ = [
    "MaskGenerator",
    "PretrainTransform",
    "SimMIM",
    "export_encoder",
    "load_checkpoint",
    "normalize_images",
    "reconstruction_grid",
]
