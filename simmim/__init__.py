"""SimMIM masked image modelling on Swin V1/V2 backbones (arXiv 2111.09886): masks, model and loss, checkpoints,
pretraining transform and reconstruction grids. Depends on :mod:`swinv2`, never the reverse."""

from __future__ import annotations

from .heldout import HeldOutTransform, heldout_loss
from .layouts import export_encoder, load_checkpoint
from .masking import MaskGenerator
from .model import SimMIM, local_normalize
from .transforms import PretrainTransform, normalize_images
from .visualize import reconstruction_grid

__all__ = [
    "HeldOutTransform",
    "MaskGenerator",
    "PretrainTransform",
    "SimMIM",
    "export_encoder",
    "heldout_loss",
    "load_checkpoint",
    "local_normalize",
    "normalize_images",
    "reconstruction_grid",
]
