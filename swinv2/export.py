"""A trained classifier (or backbone) out to the places it is used: our safetensors layout, timm's and
Hugging Face transformers'.

- :func:`read_our_state` -- weights from a run directory / DeepSpeed checkpoint (consolidated to fp32) or from
  any weights file, renamed to our layout (what ``swinv2.create_model(name, checkpoint=...)`` loads).
- :func:`encoder_state_dict` -- the backbone of a SimMIM run, as ``swinv2.create_model`` loads it.
- :func:`timm_kwargs` -- the ``timm.create_model`` arguments that rebuild a model spec in timm.
- :func:`export_timm` -- our weights -> timm's layout (``timm_model.safetensors``) plus ``timm_config.json``;
  ``timm.create_model(name, **kwargs).load_state_dict(...)`` then gives the same logits as our model.
- :func:`export_transformers` -- our weights -> a transformers checkpoint directory (``config.json``,
  ``model.safetensors``, ``preprocessor_config.json``) that ``AutoModelForImageClassification`` (a classifier),
  ``AutoModel`` (a backbone) or ``Swin(v2)ForMaskedImageModeling`` (a SimMIM run; its backbone also goes to
  ``backbone/``) load with no missing or unexpected keys and run to the same outputs (:mod:`swinv2.hf_layout` lists
  where transformers computes otherwise).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .files import save_safetensors, write_text_atomic
from .finetune.weights import create_from_spec, find_model_json, resolve_spec
from .hf_layout import config_from_model, from_transformers, read_config, to_transformers
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
    if path.is_dir() and read_config(path) is not None:  # a transformers directory: SimMIM names for a MIM model
        backbone, extras, _ = from_transformers(read_state_dict(path))
        state = {"encoder." + k: v for k, v in backbone.items()} | extras if extras else backbone
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
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


# ------------------------------------------------------------------------------------------------- transformers

RUN_CONFIG = "config.yaml"
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "random": 3}  # eval: random -> bicubic


def find_run_config(checkpoint: str | os.PathLike) -> dict | None:
    """The resolved ``config.yaml`` of the run a checkpoint belongs to (in it or up to three folders above), or
    None."""
    import yaml

    path = Path(checkpoint).resolve()
    for folder in [path, *path.parents][:4]:
        if (folder / RUN_CONFIG).is_file():
            loaded = yaml.safe_load((folder / RUN_CONFIG).read_text())
            return loaded if isinstance(loaded, dict) else None
    return None


def run_spec(checkpoint: str | os.PathLike, name: str | None = None, **overrides: Any) -> dict:
    """Like :func:`~swinv2.finetune.weights.resolve_spec`, but a run without ``model.json`` (a SimMIM pretraining
    run) is described by the ``model`` section of its ``config.yaml``."""
    run = find_run_config(checkpoint)
    if read_config(checkpoint) is not None or find_model_json(checkpoint) is not None or not (run or {}).get("model"):
        return resolve_spec(checkpoint, name, **overrides)
    from .train.config import ModelConfig

    section = ModelConfig(**run["model"])
    spec = {"name": name or section.name, "options": {**section.create_kwargs(training=False), "num_classes": 0}}
    spec["options"].update({k: v for k, v in overrides.items() if v is not None})
    return spec


def dataset_classes(checkpoint: str | os.PathLike) -> list[str] | None:
    """The class names of the data a run trained on: ``classes`` in the ``dataset.json`` beside its first training
    (else evaluation) shard, as ``launch/make_shards.py`` writes it; None when unknown."""
    from .data.urls import expand_urls

    data = (find_run_config(checkpoint) or {}).get("data") or {}
    for key in ("train_urls", "eval_urls"):
        if not data.get(key):
            continue
        try:
            urls = expand_urls(data[key])
        except (ValueError, OSError):  # moved or remote shards: the labels stay LABEL_i
            continue
        index = Path(urls[0]).parent / "dataset.json" if "://" not in urls[0] else None
        if index is not None and index.is_file():
            classes = json.loads(index.read_text()).get("classes")
            if classes:
                return [str(c) for c in classes]
    return None


def preprocessor_config(img_size: int | tuple[int, int] | list[int], crop_pct: float = 0.875,
                        interpolation: str = "bicubic", mean: Any = (0.485, 0.456, 0.406),
                        std: Any = (0.229, 0.224, 0.225)) -> dict:
    """transformers' ``BitImageProcessor`` settings for our evaluation transform
    (:func:`swinv2.data.transforms.eval_transform`): resize the shorter side to ``floor(img_size / crop_pct)``,
    centre crop ``img_size``, scale to [0, 1], normalise with ``mean``/``std``."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": math.floor(height / crop_pct)},
        "resample": PIL_RESAMPLE[interpolation],
        "do_center_crop": True,
        "crop_size": {"height": height, "width": width},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(m) for m in mean],
        "image_std": [float(s) for s in std],
    }


def transformers_state_dict(model: torch.nn.Module, window_size: Any, kind: str,
                            simmim: dict[str, torch.Tensor] | None = None,
                            labels: list[str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json settings, weights named as save_pretrained writes them)`` for our ``model`` as the
    transformers class of ``kind`` ("classifier", "backbone" or "simmim" with ``simmim`` holding ``mask_token``
    and ``decoder.0.*``). Raises ``ValueError`` naming what transformers cannot express."""
    config = config_from_model(model, window_size, kind, labels)
    state = dict(model.state_dict())
    if kind == "backbone":
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if kind == "simmim":
        state = {k: v for k, v in state.items() if not k.startswith("head.")} | (simmim or {})
    weights = to_transformers(state, model.version, kind)
    return config, {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().cpu()
                    for k, v in weights.items()}


def _check_simmim_parts(model: torch.nn.Module, parts: dict[str, torch.Tensor], spec: dict) -> None:
    stride = model.patch_size * 2 ** sum(stage.downsample is not None for stage in model.layers)
    want = {"mask_token": (model.embed_dim,),
            "decoder.0.weight": (stride**2 * model.patch_embed.in_chans, model.num_features, 1, 1),
            "decoder.0.bias": (stride**2 * model.patch_embed.in_chans,)}
    for key, shape in want.items():
        got = parts.get(key)
        if got is None or got.numel() != math.prod(shape):
            raise ValueError(f"the SimMIM checkpoint's {key} {tuple(got.shape) if got is not None else '(missing)'} "
                             f"does not fit {spec['name']} {spec['options']} (expected {shape}): pass the model it "
                             "was pretrained as (--model, --img-size, --window)")


def export_transformers(state: dict[str, torch.Tensor], spec: dict, out: str | os.PathLike, *,
                        labels: list[str] | None = None, data: dict | None = None) -> list[Path]:
    """Write ``state`` (ours; a SimMIM state with ``encoder.*``, ``mask_token``, ``decoder.0.*`` included) as a
    transformers checkpoint directory ``out`` for the model ``spec`` describes; returns the files written.

    A classifier becomes ``Swin(v2)ForImageClassification`` (``labels``, when there is one per class, as its
    ``id2label``), a backbone (``num_classes=0``) ``Swin(v2)Model``, a SimMIM state
    ``Swin(v2)ForMaskedImageModeling`` plus its backbone in ``out/backbone``. ``data`` (the run's ``data`` section:
    ``crop_pct``, ``interpolation``, ``mean``, ``std``) shapes ``preprocessor_config.json``. Raises ``ValueError``
    (one sentence) when the weights do not fit ``spec`` or transformers cannot express the model.
    """
    try:
        import transformers  # optional dependency; never imported by ``import swinv2``
    except ImportError:
        raise ValueError("writing a transformers checkpoint needs the transformers package: pip install "
                         "'swinv2[hf]' (or transformers>=4.46)") from None

    simmim = any(k.startswith("encoder.") for k in state)
    if simmim:
        spec = {"name": spec["name"], "options": {**spec["options"], "num_classes": 0}}
        parts = {k: v for k, v in state.items() if k == "mask_token" or k.startswith("decoder.")}
        state = encoder_state_dict(state)
    model = create_from_spec(spec)
    report = load_checkpoint(model, state)
    if report.missing or report.unexpected or report.reinitialized:
        problem = report.reinitialized or report.missing or report.unexpected
        raise ValueError(f"the checkpoint does not fit {spec['name']} {spec['options']} ({problem[0]} ...): pass the "
                         "model it was trained as (--model, --img-size, --window, --num-classes)")
    if simmim:
        _check_simmim_parts(model, parts, spec)
    from .variants import VARIANTS

    window = {**VARIANTS[spec["name"]], **spec["options"]}["window_size"]
    data = {k: v for k, v in (data or {}).items() if k in ("crop_pct", "interpolation", "mean", "std")}
    kinds = [("simmim", Path(out)), ("backbone", Path(out) / "backbone")] if simmim else \
        [("classifier" if model.num_classes > 0 else "backbone", Path(out))]
    jobs = [(folder, *transformers_state_dict(model, window, kind, parts if kind == "simmim" else None, labels))
            for kind, folder in kinds]  # every check passes before anything is written
    written = []
    for folder, settings, weights in jobs:
        config_class = transformers.Swinv2Config if settings["model_type"] == "swinv2" else transformers.SwinConfig
        config = config_class(**{k: v for k, v in settings.items() if k != "model_type"})
        # weights first and config.json last: a folder whose write was cut short has no config and is no checkpoint
        written.append(save_safetensors(weights, folder / "model.safetensors", metadata={"format": "pt"}))
        written.append(write_text_atomic(folder / "preprocessor_config.json",
                                         json.dumps(preprocessor_config(model.img_size, **data), indent=1) + "\n"))
        written.append(write_text_atomic(folder / "config.json", config.to_json_string()))
    return written
