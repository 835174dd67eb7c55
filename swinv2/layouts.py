"""Read any Swin checkpoint layout, adapt it to the model at hand, report what changed; write ours or timm's.

Layouts understood (auto-detected): ours and the authors' (patch merging at the END of stage N as
``layers.N.downsample``, classifier ``head``; the authors' files keep the weights under ``model``); timm's
(patch merging at the START of stage N+1, classifier ``head.fc``); the authors' SimMIM files (``encoder.``
prefix, ``decoder.*``, ``encoder.mask_token``); DeepSpeed/DDP wrappers (``module``); Hugging Face transformers'
(``Swin*``/``Swinv2*`` models, separate q/k/v fused into our ``qkv``; :mod:`swinv2.hf_layout`). Files are
``.pth``/``.pt``/``.bin`` (read with ``weights_only=True``) or ``.safetensors``; a transformers checkpoint
directory (``config.json`` plus its weights, as ``save_pretrained`` writes it) is read as one checkpoint.

Adaptation (Swin V2 arXiv 2111.09883 sec. 3.3; Swin V1 arXiv 2103.14030 sec. 4.1 fine-tuning): V2 needs none,
its coordinate tables are derived from the model's windows and pretrained windows; V1 relative position bias
tables and absolute position embeddings are resized bicubically; a head of another class count is
re-initialised; derived buffers (indices, coordinate tables, shift masks) are dropped.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .files import save_safetensors, write_atomic
from .hf_layout import LAYOUT as TRANSFORMERS_LAYOUT
from .hf_layout import from_transformers, is_transformers_dir, looks_like_transformers, weight_files
from .layers import trunc_normal_

DERIVED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state")


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did; ``print(report)`` gives a readable summary."""

    layout: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"checkpoint layout: {self.layout}; loaded {len(self.loaded)} tensors"]
        for title, items in (
            ("adapted", self.adapted),
            ("re-initialised", self.reinitialized),
            ("missing (kept their initial values)", self.missing),
            ("unexpected (ignored)", self.unexpected),
            ("dropped", self.dropped),
        ):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {item}" for item in items]
        return "\n".join(lines)


def unpickling_refused(what: str | os.PathLike, error: BaseException, names: list[str] | None = None) -> str:
    """The first half of the sentence refusing a file that weights-only loading stopped at: which file, and the
    classes or functions it names (``names``, else from torch's message; never torch's advice to allow code)."""
    names = sorted(set(names or re.findall(r"GLOBAL ([\w.]+)", str(error))))
    held = f"a pickled {', '.join(names)}" if names else "pickled objects"
    return (f"checkpoint {str(what)!r} holds {held} besides weights and plain data, so it was not loaded, since "
            "unpickling it could run code")


def read_state_dict(source: str | os.PathLike | dict) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from a path or an (possibly wrapped) state dict, never unpickling code."""
    if not isinstance(source, dict) and is_transformers_dir(source):
        merged: dict[str, torch.Tensor] = {}
        for file in weight_files(source):  # one file, or the shards its index names
            merged.update(read_state_dict(file))
        return merged
    if not isinstance(source, dict):
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"{str(path)!r} is a folder, not a weights file or a transformers checkpoint directory "
                             "(no config.json with model_type swin or swinv2): pass a .pth/.safetensors file or "
                             "the folder save_pretrained wrote")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: check the path")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                source = load_file(str(path))
            except SafetensorError as error:
                raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file ({error}); it may be "
                                 "truncated: copy or export it again") from None
        else:
            try:
                source = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as error:
                try:  # every class and function the file's pickle names, read without running any of them
                    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                except Exception:  # noqa: BLE001 - not a torch.save zip file: what torch's message names
                    names = None
                raise ValueError(
                    f"{unpickling_refused(path, error, names)}: if what it names is plain data you trust, load the "
                    "file with torch.load(weights_only=True) inside torch.serialization.safe_globals([...]) naming "
                    "it, and save the state dict with safetensors.torch.save_file; then pass that .safetensors file"
                ) from None
            except Exception as error:  # noqa: BLE001 - any unreadable file gets the same sentence
                raise ValueError(
                    f"checkpoint {str(path)!r} cannot be read as weights-only (.pth/.pt/.safetensors) "
                    f"({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}): it may "
                    "be truncated or not a checkpoint; copy or export it again"
                ) from None
    state = source
    for _ in range(3):  # e.g. {"model": {...}} (authors), {"module": {...}} (DeepSpeed)
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError("the checkpoint holds no tensors: pass a model state dict or a file that contains one")
    return tensors


def to_our_layout(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Rename any known layout to ours. Returns (state, layout name, dropped keys)."""
    dropped: list[str] = []
    layout = "ours/authors'"
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if looks_like_transformers(state):
        state, extras, dropped = from_transformers(state)
        # a masked-image model's mask token and decoder have no place in a plain Swin (simmim.load_checkpoint
        # takes them)
        return state, TRANSFORMERS_LAYOUT, dropped + sorted(extras)
    if any(k.startswith("encoder.") for k in state):
        layout = "SimMIM (encoder)"
        dropped += [k for k in state if not k.startswith("encoder.") or k == "encoder.mask_token"]
        state = {
            k.removeprefix("encoder."): v
            for k, v in state.items()
            if k.startswith("encoder.") and k != "encoder.mask_token"
        }
    # timm merges patches at the START of stage N+1 (stage 0 has none) and names the classifier head.fc
    merging_at_start = any(".downsample." in k for k in state) and not any(
        k.startswith("layers.0.downsample.") for k in state
    )
    if merging_at_start or "head.fc.weight" in state:
        layout = "timm"
        renamed = {}
        for k, v in state.items():
            k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
            renamed["head." + k[8:] if k.startswith("head.fc.") else k] = v
        state = renamed
    derived = [k for k in state if k.rsplit(".", 1)[-1] in DERIVED_BUFFERS]
    dropped += derived
    state = {k: v for k, v in state.items() if k not in derived}
    if layout == "timm" and "absolute_pos_embed" in state and state["absolute_pos_embed"].dim() == 4:
        state["absolute_pos_embed"] = state["absolute_pos_embed"].flatten(1, 2)
    return state, layout, dropped


def _resize_bias_table(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``((2w-1)^2, nH)`` square-window table -> ``((2wh-1)*(2ww-1), nH)``, bicubic per head."""
    rows, heads = table.shape
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(
            f"a relative position bias table of {rows} rows is not from a square window: cannot resize it"
        )
    grid = table.t().reshape(1, heads, side, side).float()
    grid = F.interpolate(grid, size=(2 * window[0] - 1, 2 * window[1] - 1), mode="bicubic", align_corners=False)
    return grid.reshape(heads, -1).t().to(table.dtype)


def _resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(1, L, C)`` square-grid absolute position embedding -> ``(1, H*W, C)``, bicubic."""
    _, length, channels = pos.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"an absolute position embedding of {length} positions is not square: cannot resize it")
    pos = pos.reshape(1, side, side, channels).permute(0, 3, 1, 2).float()
    pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
    return pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], channels)


def _check_version(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    is_v1 = any(k.endswith("relative_position_bias_table") for k in state)
    is_v2 = any(".cpb_mlp." in k for k in state)
    version = getattr(model, "version", None)
    if version == "v2" and is_v1 and not is_v2:
        raise ValueError(
            "the checkpoint is a Swin V1 model but the model is Swin V2: create a swin_* (V1) model for it"
        )
    if version == "v1" and is_v2:
        raise ValueError("the checkpoint is a Swin V2 model but the model is Swin V1: create a swinv2_* model for it")


def adapt_to_model(state: dict[str, torch.Tensor], model: nn.Module, report: LoadReport) -> dict[str, torch.Tensor]:
    """Resize or drop tensors whose shapes differ from the model's; anything else that differs is an error."""
    _check_version(state, model)
    target = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue
        want = target[key].shape
        if key.endswith("relative_position_bias_table"):
            window = model.get_submodule(key.rsplit(".", 1)[0]).window
            out[key] = _resize_bias_table(value, window)
            report.adapted.append(f"{key}: bias table {tuple(value.shape)} -> {tuple(want)} (bicubic, window {window})")
        elif key == "absolute_pos_embed":
            out[key] = _resize_pos_embed(value, model.patch_grid).to(value.dtype)
            report.adapted.append(f"{key}: {tuple(value.shape)} -> {tuple(want)} (bicubic)")
        elif key.startswith("head."):
            del out[key]
            if key == "head.weight":
                report.reinitialized.append(
                    f"head: the checkpoint has {value.shape[0]} classes, the model {want[0]}; head re-initialised"
                )
        else:
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(value.shape)} but the model expects {tuple(want)}: "
                "the checkpoint is for another architecture; create the model it was trained as "
                "(same size, embed_dim, depths and heads)"
            )
    if getattr(model, "version", None) == "v2" and any(".cpb_mlp." in k for k in state):
        windows = getattr(model, "stage_windows", None)
        pretrained = [block.attn.pretrained_window for stage in model.layers for block in stage.blocks[:1]]
        report.adapted.append(
            f"V2 position bias: coordinate tables rebuilt for stage windows {windows} "
            f"(normalised by pretrained windows {pretrained}); CPB MLP weights kept"
        )
    return out


def load_checkpoint(model: nn.Module, source: str | os.PathLike | dict) -> LoadReport:
    """Load a checkpoint of any known layout into a Swin model, adapting it; returns a :class:`LoadReport`."""
    state, layout, dropped = to_our_layout(read_state_dict(source))
    report = LoadReport(layout=layout, dropped=dropped)
    state = adapt_to_model(state, model, report)
    target_keys = set(model.state_dict())
    report.loaded = sorted(k for k in state if k in target_keys)
    if not report.loaded:
        raise ValueError(
            f"none of the checkpoint's {len(state)} tensors (e.g. {next(iter(state))!r}) match the model: "
            "it is not a Swin checkpoint of a known layout"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = getattr(model, "head", None)
    if any(r.startswith("head:") for r in report.reinitialized) and isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    report.missing = [k for k in missing if not k.startswith("head.") or not report.reinitialized]
    report.unexpected = list(unexpected)
    return report


def export_timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our model's weights renamed to timm's layout (``timm.create_model(...).load_state_dict(sd)`` takes them)."""
    if getattr(model, "absolute_pos_embed", None) is not None:
        raise ValueError("timm's Swin models have no absolute position embedding: export a model built with ape=False")
    out = {}
    for key, value in model.state_dict().items():
        if ".extra_norm." in key:
            raise ValueError(
                "timm's Swin models have no extra main-branch norm: export a model with extra_norm_every=0"
            )
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        out["head.fc." + key[5:] if key.startswith("head.") else key] = value
    return out


def save_checkpoint(model: nn.Module, path: str | os.PathLike, layout: str = "ours") -> Path:
    """Write the weights (``layout="ours"`` or ``"timm"``) as safetensors or ``.pth``, atomically."""
    if layout not in ("ours", "timm"):
        raise ValueError(f"layout must be 'ours' or 'timm', got {layout!r}")
    state = export_timm_state_dict(model) if layout == "timm" else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        return save_safetensors(state, path)  # with the mode the umask gives (safetensors alone would give 0600)
    return write_atomic(path, lambda tmp: torch.save(state, tmp))
