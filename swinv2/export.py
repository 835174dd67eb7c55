"""A trained classifier (or backbone) out to the places it is used: our safetensors layout and timm's.

- :func:`read_our_state` -- weights from a run directory / DeepSpeed checkpoint (consolidated to fp32) or from
  any weights file, renamed to our layout (what ``swinv2.create_model(name, checkpoint=...)`` loads).
- :func:`encoder_state_dict` -- the backbone of a SimMIM run, as ``swinv2.create_model`` loads it.
- :func:`timm_kwargs` -- the ``timm.create_model`` arguments that rebuild a model spec in timm.
- :func:`export_timm` -- our weights -> timm's layout (``timm_model.safetensors``) plus ``timm_config.json``;
  ``timm.create_model(name, **kwargs).load_state_dict(...)`` then gives the same logits as our model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .files import save_safetensors, write_text_atomic
from .finetune.weights import create_from_spec
from .layouts import export_timm_state_dict, load_checkpoint, read_state_dict, to_our_layout
from .train.consolidate import consolidated_state_dict
from .variants import VARIANTS

_TIMM_KEYS = ("img_size", "embed_dim", "depths", "num_heads", "window_size", "num_classes")


def read_our_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """fp32 weights in our layout from a run directory, DeepSpeed checkpoint folder or weights file.

    SimMIM runs keep their ``encoder.*`` / ``mask_token`` / ``decoder.*`` names (``launch/convert.py`` writes the
    encoder separately); every other layout (the authors', timm's) is renamed to ours, derived buffers dropped.
    """
    path = Path(path)
    if path.is_dir():
        return consolidated_state_dict(path)
    state = read_state_dict(path)
    if any(k.startswith("encoder.") for k in state):
        return {k: v.float() for k, v in state.items()}
    ours, _, _ = to_our_layout(state)
    return {k: v.float() if v.is_floating_point() else v for k, v in ours.items()}


def encoder_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone of a SimMIM state dict (``encoder.*``, mask token and decoder dropped), as swinv2 loads it."""
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        raise ValueError("the checkpoint has no encoder.* weights: it is not a SimMIM checkpoint")
    return encoder


def timm_kwargs(spec: dict) -> dict:
    """``timm.create_model(spec["name"], **timm_kwargs(spec))`` builds the same architecture as our spec."""
    full = {**VARIANTS[spec["name"]], **spec["options"]}
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in full.items() if k in _TIMM_KEYS}
    kwargs.setdefault("num_classes", 1000)
    if full.get("version") == "v2":
        pretrained = full.get("pretrained_window_sizes") or 0
        kwargs["pretrained_window_sizes"] = [pretrained] * len(full["depths"]) if isinstance(pretrained, int) \
            else list(pretrained)
    return kwargs


def export_timm(state: dict[str, torch.Tensor], spec: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Load ``state`` into the model ``spec`` describes (every weight must fit), write it in timm's layout as
    ``out/timm_model.safetensors`` and the ``timm.create_model`` call as ``out/timm_config.json``."""
    model = create_from_spec(spec)
    report = load_checkpoint(model, state)
    if report.missing or report.unexpected or report.reinitialized:
        problem = report.reinitialized or report.missing or report.unexpected
        raise ValueError(f"the checkpoint does not fit {spec['name']} {spec['options']} ({problem[0]} ...): pass the "
                         "model it was trained as (--model, --img-size, --window, --num-classes)")
    out = Path(out)
    weights = save_safetensors(export_timm_state_dict(model), out / "timm_model.safetensors")
    config = write_text_atomic(out / "timm_config.json",
                               json.dumps({"model_name": spec["name"], "kwargs": timm_kwargs(spec)}, indent=1) + "\n")
    return weights, config
