"""Load SimMIM checkpoints (ours and the authors') and export the pretrained encoder as a plain backbone.

Hugging Face transformers' ``Swin(v2)ForMaskedImageModeling`` directories load too, mask token and decoder included
(:mod:`swinv2.hf_layout`). The encoder goes through the same path as :func:`swinv2.load_checkpoint` (layout
renaming, derived buffers dropped, V1 bias tables resized to the model's windows, V2 coordinate tables rebuilt), so
a checkpoint pretrained at one window loads into a SimMIM model at another (Swin V2 arXiv 2111.09883 sec. 3.3).
"""

from __future__ import annotations

import os

import torch

from swinv2.hf_layout import LAYOUT as TRANSFORMERS_LAYOUT
from swinv2.hf_layout import from_transformers, looks_like_transformers
from swinv2.layouts import LoadReport, adapt_to_model, read_state_dict, to_our_layout

from .model import SimMIM

AUTHORS_TOKEN, OUR_TOKEN = "encoder.mask_token", "mask_token"


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict, str]:
    """(backbone tensors named as in the encoder, SimMIM-only tensors named as in :class:`SimMIM`, layout)."""
    simmim = {k: v for k, v in state.items() if k.startswith("decoder.")}
    if AUTHORS_TOKEN in state:
        simmim[OUR_TOKEN] = state[AUTHORS_TOKEN]
    elif OUR_TOKEN in state:
        simmim[OUR_TOKEN] = state[OUR_TOKEN]
    if any(k.startswith("encoder.") for k in state):
        layout = "SimMIM (authors')" if AUTHORS_TOKEN in state else "SimMIM (ours)"
        backbone = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    else:  # a plain backbone (ours, the authors', timm's): SimMIM starting from supervised weights
        layout = "backbone only"
        backbone = {k: v for k, v in state.items() if k != OUR_TOKEN and not k.startswith("decoder.")}
    backbone.pop("mask_token", None)
    return backbone, simmim, layout


def load_checkpoint(model: SimMIM, source: str | os.PathLike | dict) -> LoadReport:
    """Load a SimMIM checkpoint (a path or a state dict, ours or the authors') into ``model``, adapting it.

    The authors' files hold ``encoder.*`` (with ``encoder.mask_token``) and ``decoder.0.*`` under ``model``; ours
    hold ``encoder.*``, ``mask_token`` and ``decoder.0.*``. A plain Swin backbone also loads (into the encoder;
    the mask token and decoder keep their initial values and are listed as missing). Returns a
    :class:`swinv2.LoadReport`.
    """
    if not isinstance(model, SimMIM):
        raise ValueError(
            f"simmim.load_checkpoint loads into a SimMIM model, got {type(model).__name__}: "
            "use swinv2.load_checkpoint for a plain Swin model"
        )
    state = {k.removeprefix("module."): v for k, v in read_state_dict(source).items()}
    foreign: list[str] = []  # dropped keys named as in a transformers file
    if looks_like_transformers(state):  # a transformers masked-image model (or a plain one: no token, no decoder)
        backbone, simmim, foreign = from_transformers(state)  # already in our layout, derived buffers dropped
        layout, dropped = TRANSFORMERS_LAYOUT, []
    else:
        backbone, simmim, layout = _split(state)
        backbone, inner_layout, dropped = to_our_layout(backbone)
        if inner_layout != "ours/authors'":
            layout = f"{layout}, encoder in {inner_layout} layout"
    prefix = "" if layout.startswith("backbone") else "encoder."
    heads = [k for k in backbone if k.startswith("head.")]  # a classifier's head: the encoder has none
    report = LoadReport(layout=layout, dropped=foreign + [prefix + k for k in dropped + heads])
    backbone = adapt_to_model({k: v for k, v in backbone.items() if k not in heads}, model.encoder, report)

    target = model.state_dict()
    if OUR_TOKEN in simmim:
        token, want = simmim[OUR_TOKEN], target[OUR_TOKEN].shape
        if token.numel() != want.numel():
            raise ValueError(
                f"the checkpoint's mask token has {token.numel()} channels but the encoder embeds to {want[-1]}: "
                "the checkpoint is for another architecture; create the encoder it was pretrained with"
            )
        simmim[OUR_TOKEN] = token.reshape(want)  # the authors' (1, 1, C); tolerate (C,) from other exports
    for key, value in simmim.items():
        if key in target and target[key].shape != value.shape:
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(target[key].shape)}: the checkpoint's decoder is for another encoder width, stride or "
                "in_chans; create the SimMIM model it was pretrained as"
            )
    full = {"encoder." + k: v for k, v in backbone.items()} | simmim
    report.loaded = sorted(k for k in full if k in target)
    if not any(k.startswith("encoder.") for k in report.loaded):
        raise ValueError(
            f"none of the checkpoint's {len(state)} tensors (e.g. {next(iter(state))!r}) match the SimMIM encoder: "
            "it is not a Swin or SimMIM checkpoint of a known layout"
        )
    missing, unexpected = model.load_state_dict(full, strict=False)
    report.missing, report.unexpected = list(missing), list(unexpected)
    return report


def export_encoder(model: SimMIM) -> dict[str, torch.Tensor]:
    """The pretrained backbone's weights (CPU copies, no mask token or decoder), in the layout that
    :func:`swinv2.load_checkpoint` and ``swinv2.create_model(..., checkpoint=...)`` take, e.g. to fine-tune a
    classifier at a larger resolution and window (SimMIM arXiv 2111.09886 sec. 4.1; Swin V2 sec. 3.3)."""
    if not isinstance(model, SimMIM):
        raise ValueError(f"export_encoder takes a SimMIM model, got {type(model).__name__}: pass the SimMIM wrapper")
    return {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}
