"""Swin Transformer V1/V2 models (arXiv 2103.14030, arXiv 2111.09883): create, list, load, export."""

from __future__ import annotations

import inspect

from .layouts import LoadReport, export_timm_state_dict, load_checkpoint
from .model import SwinTransformer
from .variants import VARIANTS

__all__ = [
    "LoadReport",
    "SwinTransformer",
    "create_model",
    "export_timm_state_dict",
    "list_models",
    "load_checkpoint",
]


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(VARIANTS)


def create_model(name: str, checkpoint=None, **overrides) -> SwinTransformer:
    """Build a named Swin model (timm spelling), e.g. ``create_model("swinv2_tiny_window8_256", num_classes=10)``.

    ``overrides`` replace any constructor argument of :class:`SwinTransformer` (``img_size``, ``window_size``,
    ``pretrained_window_sizes``, ``num_classes``, ``drop_path_rate``, ``ape``, ``checkpoint_activations``,
    ``attn_chunk_size``, ``extra_norm_every``, ``fused_attn``, ``cpu_kernels``, ...). ``checkpoint`` (a path or
    state dict) is loaded with :func:`load_checkpoint`, adapting it to the model's size and window.
    """
    if name not in VARIANTS:
        close = [n for n in VARIANTS if n.split("_")[:2] == name.split("_")[:2]] or list_models()
        raise ValueError(f"unknown model {name!r}: choose one of swinv2.list_models(), e.g. {', '.join(close[:4])}")
    unknown = sorted(set(overrides) - set(inspect.signature(SwinTransformer).parameters))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for create_model: see swinv2.SwinTransformer for the options")
    model = SwinTransformer(**{**VARIANTS[name], **overrides})
    if checkpoint is not None:
        print(load_checkpoint(model, checkpoint))
    return model
