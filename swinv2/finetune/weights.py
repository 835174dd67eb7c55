"""Which classifier a run trains (``model.json``) and where its starting weights come from.

``model.json`` holds ``swinv2.create_model``'s arguments (``{"name": ..., "options": {...}}``); a fine-tuning
run writes it next to its checkpoints so that evaluation and conversion rebuild the same model without being told
the architecture again. Pretrained weights come from a run directory or DeepSpeed checkpoint (consolidated to fp32
first) or any weights file :func:`swinv2.load_checkpoint` reads (ours, the authors' SimMIM or classification
checkpoints, timm's), or a Hugging Face transformers checkpoint directory (its ``config.json`` then describes the
model in place of ``model.json``), adapted to the new resolution and window (Swin V2 arXiv 2111.09883 sec. 3.3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

import swinv2

from ..files import write_text_atomic
from ..hf_layout import read_config, spec_from_config
from ..train.consolidate import consolidated_state_dict
from .config import ClassifierConfig

MODEL_JSON = "model.json"


def model_spec(m: ClassifierConfig) -> dict:
    """``{"name", "options"}`` for ``swinv2.create_model`` from a model config section. Only the options that shape
    the weights or the forward pass: the file describes the model for inference and export."""
    return {"name": m.name, "options": m.create_kwargs(training=False)}


def build_classifier(m: ClassifierConfig) -> nn.Module:
    """The classifier a fine-tuning config describes, with its training-only options."""
    return swinv2.create_model(m.name, **m.create_kwargs())


def write_model_json(spec: dict, folder: str | os.PathLike) -> Path:
    """``folder/model.json``, written via a temporary name and a rename."""
    return write_text_atomic(Path(folder) / MODEL_JSON, json.dumps(spec, indent=1) + "\n")


def find_model_json(checkpoint: str | os.PathLike) -> Path | None:
    """The ``model.json`` of the run a checkpoint belongs to: in it, or up to three folders above it
    (``run/best.safetensors``, ``run/checkpoints/step00000100``)."""
    path = Path(checkpoint).resolve()
    for folder in [path, *path.parents][:4]:
        if (folder / MODEL_JSON).is_file():
            return folder / MODEL_JSON
    return None


def resolve_spec(checkpoint: str | os.PathLike | None, name: str | None = None, **overrides: Any) -> dict:
    """The model to build for ``checkpoint``: a transformers directory's ``config.json``, else its run's
    ``model.json`` if any, then ``name`` and the non-None ``overrides`` (``img_size``, ``window_size``,
    ``num_classes``, ...) on top."""
    hf_config = read_config(checkpoint) if checkpoint is not None else None
    found = find_model_json(checkpoint) if checkpoint is not None and hf_config is None else None
    if hf_config is not None:
        spec = spec_from_config(hf_config)
    else:
        spec = json.loads(found.read_text()) if found else {"name": None, "options": {}}
    if name:
        spec["name"] = name
    spec["options"].update({k: v for k, v in overrides.items() if v is not None})
    if not spec["name"]:
        raise ValueError(f"no {MODEL_JSON} next to {str(checkpoint)!r} says which model it is: pass --model NAME "
                         "(and --img-size, --window, --num-classes as it was trained)")
    return spec


def create_from_spec(spec: dict) -> nn.Module:
    return swinv2.create_model(spec["name"], **spec["options"])


class WeightsError(ValueError):
    """Weights that cannot be used, explained in one sentence (missing, unreadable, another architecture)."""


def check_exists(source: str | os.PathLike) -> Path:
    """``source`` as a path, or a :class:`WeightsError` saying what to pass instead."""
    path = Path(source)
    if not path.exists():
        raise WeightsError(
            f"weights {str(source)!r} do not exist: pass a pretraining run directory, a DeepSpeed checkpoint "
            "folder, a weights file (.pth/.pt/.safetensors) or a transformers checkpoint directory (for "
            "fine-tuning, pretrained= starts from scratch)"
        )
    return path


def load_pretrained(model: nn.Module, source: str | os.PathLike) -> swinv2.LoadReport:
    """Load ``source`` into ``model`` (any layout; adapted to its resolution, window and classes).

    A directory is a transformers checkpoint directory (``config.json`` with model_type swin or swinv2), or else a
    pretraining or fine-tuning run, its ``checkpoints`` folder or one DeepSpeed checkpoint: the newest complete
    checkpoint is consolidated to fp32 (ZeRO shards merged) first. Anything else is a file. Raises
    :class:`WeightsError` for anything the user can fix.
    """
    path = check_exists(source)
    try:
        if path.is_dir() and read_config(path) is None:
            report = swinv2.load_checkpoint(model, consolidated_state_dict(path))
            report.layout = f"DeepSpeed checkpoint, {report.layout}"
            return report
        return swinv2.load_checkpoint(model, path)
    except (FileNotFoundError, ValueError) as error:  # the loaders' own one-sentence explanations
        raise WeightsError(f"cannot load {str(source)!r}: {error}") from None


def check_head_loaded(report: swinv2.LoadReport, source: str | os.PathLike) -> None:
    """Evaluation needs a trained classifier: a missing or re-initialised head would score chance, silently."""
    if report.reinitialized or any(k.startswith("head.") for k in report.missing):
        raise WeightsError(
            f"{str(source)!r} has no classifier head for this model ({'; '.join(report.reinitialized) or 'missing'}):"
            " pass a fine-tuned checkpoint, or --num-classes as it was fine-tuned"
        )
