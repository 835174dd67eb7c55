"""The Hugging Face transformers layout of Swin V1 (``SwinModel``, ``SwinForImageClassification``,
``SwinForMaskedImageModeling``) and Swin V2 (``Swinv2*``): key names both ways and ``config.json`` <-> our spec.

A transformers checkpoint directory is what ``save_pretrained`` writes: ``config.json`` plus ``model.safetensors``
(or ``pytorch_model.bin``, read weights-only; sharded files through their ``*.index.json``). Its weights differ from
ours in names and in one place in shape: transformers keeps separate ``query``/``key``/``value`` projections, we keep
one fused ``qkv`` (Swin arXiv 2103.14030 sec. 3.2; V2's learned ``q_bias``/``v_bias`` and no key bias, arXiv
2111.09883 sec. 3.2). Everything else maps one to one by name; a key that does not map is kept under its own name
so that the load report lists it as unexpected, never dropped silently.

Where transformers computes something else than the papers and this package (documented in the README section on
transformers; measured in tests/test_hf.py):

- V2 adds the shifted-window mask twice (-200 instead of -100 between tokens of different regions). The softmax
  weight of a masked pair is ``exp(-100)`` relative or less either way, so the outputs agree unless a head's logit
  spread approaches 100 (a logit scale at its clamp of 100 and near-parallel queries and keys).
- A stage's window is clipped to the feature map by its height only (V2, at construction) or by its shorter side (V1,
  at run time, which breaks when the window shrinks below the configured one), with stage sizes from floor division;
  we clip each side on its own (timm's rule, the authors' for square maps) with ceil division. The export refuses a
  model whose windows transformers would clip otherwise (:func:`transformers_windows`).
- V2's absolute position embedding has an extra first row that its forward cannot add (it fails); V1's matches ours.
- The masked-image-modelling loss is L1 against the raw ``pixel_values`` (SimMIM's plain target) and needs square
  images; SwinV2 SimMIM pretraining uses the locally normalised target (arXiv 2111.09883 sec. 4.1).
- transformers has no extra main-branch LayerNorm (SwinV2-H/G, arXiv 2111.09883 sec. 3.1), no LayerNorm epsilon
  other than its ``layer_norm_eps`` for the block and final norms, and always normalises the patch embedding.

Nothing here imports transformers; the writer in :mod:`swinv2.export` does, when asked.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .variants import VARIANTS

LAYOUT = "transformers"
MODEL_TYPES = {"swin": "v1", "swinv2": "v2"}
PREFIXES = ("swinv2.", "swin.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_DERIVED = ("relative_position_index", "relative_coords_table")
ARCHITECTURES = {  # (version, kind) -> transformers class name
    ("v1", "classifier"): "SwinForImageClassification", ("v2", "classifier"): "Swinv2ForImageClassification",
    ("v1", "backbone"): "SwinModel", ("v2", "backbone"): "Swinv2Model",
    ("v1", "simmim"): "SwinForMaskedImageModeling", ("v2", "simmim"): "Swinv2ForMaskedImageModeling",
}

# Block-level names: transformers (the names save_pretrained writes, those of transformers 4.x; transformers 5 keeps
# V1 under other names in memory and converts them when it saves and loads) -> ours.
_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.self.logit_scale": "attn.logit_scale",
    "attention.self.continuous_position_bias_mlp": "attn.cpb_mlp",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
# transformers 5's in-memory V1 names, in case a state dict was saved with torch rather than save_pretrained.
_V5_NAMES = {
    "attention.q_proj": "attention.self.query", "attention.k_proj": "attention.self.key",
    "attention.v_proj": "attention.self.value", "attention.o_proj": "attention.output.dense",
    "attention.relative_position_bias.relative_position_bias_table": "attention.self.relative_position_bias_table",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
_TOP = {
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "embeddings.norm": "patch_embed.norm",
    "layernorm": "norm",
}
_BLOCK_KEY = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_MERGE_KEY = re.compile(r"^encoder\.layers\.(\d+)\.downsample\.(.+)$")
_QKV = re.compile(r"^attention\.self\.(query|key|value)\.(weight|bias)$")


# ------------------------------------------------------------------------------------------------- the directory


def read_config(folder: str | os.PathLike) -> dict | None:
    """The ``config.json`` of a transformers Swin directory, or None when ``folder`` is not one."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir() or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("model_type") in MODEL_TYPES else None


def is_transformers_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a transformers Swin ``config.json`` (``model_type`` swin or swinv2)."""
    return read_config(path) is not None


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a transformers directory (one file, or the shards its index names)."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    for name in INDEX_FILES:
        if (folder / name).is_file():
            index = json.loads((folder / name).read_text())
            return [folder / f for f in sorted(set(index.get("weight_map", {}).values()))]
    raise FileNotFoundError(f"transformers directory {str(folder)!r} has a config.json but no model.safetensors or "
                            "pytorch_model.bin: copy the weights next to it (as save_pretrained writes them)")


# ------------------------------------------------------------------------------------------------- keys: in


def looks_like_transformers(state: dict[str, Any]) -> bool:
    """Whether a state dict is in the transformers layout (its patch embedding is ``embeddings.patch_embeddings``)."""
    return any(re.match(r"^(swin(v2)?\.)?embeddings\.patch_embeddings\.projection\.weight$", k) for k in state)


def _version(state: dict[str, torch.Tensor]) -> str:
    v2 = any(".continuous_position_bias_mlp." in k or k.endswith(".logit_scale") for k in state)
    return "v2" if v2 else "v1"


def from_transformers(state: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """A transformers Swin state dict -> ``(backbone and head in our layout, SimMIM extras, dropped)``.

    The extras are ``mask_token`` and ``decoder.0.*`` named as in :class:`simmim.SimMIM`. ``dropped`` lists
    derived buffers and V2's unused first position-embedding row. A key that maps to nothing stays in the first dict
    under its own name, so that loading reports it as unexpected.
    """
    version = _version(state)
    ours: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block prefix, weight|bias) -> {query|key|value: t}
    for original, value in state.items():
        key = next((original[len(p):] for p in PREFIXES if original.startswith(p)), original)
        if key.rsplit(".", 1)[-1] in HF_DERIVED:
            dropped.append(original)
            continue
        if key == "embeddings.mask_token":
            extras["mask_token"] = value
        elif key.startswith("decoder."):
            extras[key] = value
        elif key == "embeddings.position_embeddings":
            if version == "v2":  # (1, L + 1, C): its first row belongs to no patch
                dropped.append(f"{original}[:, 0] (transformers' Swin V2 position embedding has one row per patch "
                               "plus one unused)")
                value = value[:, 1:]
            ours["absolute_pos_embed"] = value
        elif key.startswith("classifier."):
            ours["head." + key.removeprefix("classifier.")] = value
        elif (match := _BLOCK_KEY.match(key)) is not None:
            stage, block, rest = match.groups()
            prefix = f"layers.{stage}.blocks.{block}."
            for v5, legacy in _V5_NAMES.items():
                if rest.startswith(v5 + "."):
                    rest = legacy + rest[len(v5):]
                    break
            if (qkv_match := _QKV.match(rest)) is not None:
                role, kind = qkv_match.groups()
                qkv.setdefault((prefix, kind), {})[role] = value
                continue
            name = next((ours_name + rest[len(hf):] for hf, ours_name in _BLOCK.items()
                         if rest == hf or rest.startswith(hf + ".")), None)
            ours[prefix + name if name else original] = value
        elif (match := _MERGE_KEY.match(key)) is not None:
            ours[f"layers.{match.group(1)}.downsample.{match.group(2)}"] = value
        else:
            name = next((ours_name + key[len(hf):] for hf, ours_name in _TOP.items()
                         if key.startswith(hf + ".")), None)
            ours[name if name else original] = value
    for (prefix, kind), parts in qkv.items():
        ours.update(_fuse(prefix, kind, parts, version))
    return ours, extras, dropped


def _fuse(prefix: str, kind: str, parts: dict[str, torch.Tensor], version: str) -> dict[str, torch.Tensor]:
    """Separate q/k/v of one block -> our fused ``qkv`` (V2 biases: ``q_bias`` and ``v_bias``, k has none)."""
    hf = prefix.replace("layers.", "encoder.layers.", 1) + "attention.self."
    if kind == "bias" and version == "v2":
        out = {}
        if "query" in parts:
            out[prefix + "attn.q_bias"] = parts.pop("query")
        if "value" in parts:
            out[prefix + "attn.v_bias"] = parts.pop("value")
        out.update({hf + f"{role}.bias": t for role, t in parts.items()})  # a key bias: reported as unexpected
        return out
    if set(parts) != {"query", "key", "value"}:  # cannot fuse an incomplete set: report the pieces
        return {hf + f"{role}.{kind}": t for role, t in parts.items()}
    return {prefix + f"attn.qkv.{kind}": torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)}


# ------------------------------------------------------------------------------------------------- keys: out


def to_transformers(state: dict[str, torch.Tensor], version: str, kind: str) -> dict[str, torch.Tensor]:
    """Our model's state dict (plus ``mask_token`` and ``decoder.0.*`` for ``kind="simmim"``) -> the names
    ``save_pretrained`` writes for the transformers class :data:`ARCHITECTURES` gives ``(version, kind)``."""
    base = "" if kind == "backbone" else ("swinv2." if version == "v2" else "swin.")
    inverse_block = {ours: hf for hf, ours in _BLOCK.items()}
    inverse_top = {ours: hf for hf, ours in _TOP.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in ("relative_position_index", "relative_coords_table", "attn_mask"):
            continue
        if key == "mask_token":
            out[base + "embeddings.mask_token"] = value.reshape(1, 1, -1)
        elif key.startswith("decoder."):
            out[key] = value
        elif key.startswith("head."):
            out["classifier." + key.removeprefix("head.")] = value
        elif key == "absolute_pos_embed":
            out[base + "embeddings.position_embeddings"] = value
        elif (match := re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$", key)) is not None:
            stage, block, rest = match.groups()
            hf = f"{base}encoder.layers.{stage}.blocks.{block}."
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                kind_ = rest.rsplit(".", 1)[-1]
                for role, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                    out[hf + f"attention.self.{role}.{kind_}"] = part
            elif rest in ("attn.q_bias", "attn.v_bias"):
                out[hf + f"attention.self.{'query' if rest == 'attn.q_bias' else 'value'}.bias"] = value
            else:
                name = next((hf_name + rest[len(o):] for o, hf_name in inverse_block.items()
                             if rest.startswith(o + ".") or rest == o), None)
                if name is None:
                    raise ValueError(f"our weight {key!r} has no place in transformers' Swin: export a model "
                                     "without it")
                out[hf + name] = value
        elif (match := re.match(r"^layers\.(\d+)\.downsample\.(.+)$", key)) is not None:
            out[f"{base}encoder.layers.{match.group(1)}.downsample.{match.group(2)}"] = value
        else:
            name = next((hf_name + key[len(o):] for o, hf_name in inverse_top.items() if key.startswith(o + ".")),
                        None)
            if name is None:
                raise ValueError(f"our weight {key!r} has no place in transformers' Swin: export a model without it")
            out[base + name] = value
    return out


# ------------------------------------------------------------------------------------------------- config.json


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def spec_from_config(config: dict) -> dict:
    """``{"name", "options"}`` for ``swinv2.create_model`` from a transformers Swin ``config.json``.

    A classifier (``*ForImageClassification``) gets ``num_classes`` from its labels; a backbone or masked-image
    model gets ``num_classes=0``. Raises ``ValueError`` for a setting our model cannot reproduce.
    """
    version = MODEL_TYPES.get(config.get("model_type"))
    if version is None:
        raise ValueError(f"config.json has model_type {config.get('model_type')!r}, not swin or swinv2: pass a "
                         "transformers Swin or Swin V2 checkpoint directory")
    problems = []
    if config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {config['hidden_act']!r} (ours is the exact GELU, 'gelu')")
    if not math.isclose(float(config.get("layer_norm_eps", 1e-5)), 1e-5):
        problems.append(f"layer_norm_eps {config['layer_norm_eps']} (ours is 1e-5)")
    if version == "v2" and config.get("use_absolute_embeddings"):
        problems.append("use_absolute_embeddings with Swin V2 (transformers' own forward cannot add it)")
    if problems:
        raise ValueError(f"the transformers config has {'; '.join(problems)}: this package cannot build that model")
    architectures = config.get("architectures") or []
    classifier = any(a.endswith("ForImageClassification") for a in architectures)
    labels = config.get("id2label") or {}
    num_classes = (len(labels) if labels else int(config.get("num_labels", 2))) if classifier else 0
    depths = [int(d) for d in config.get("depths", (2, 2, 6, 2))]
    size = _pair(config.get("image_size", 224))
    options: dict[str, Any] = dict(
        img_size=size[0] if size[0] == size[1] else list(size),
        window_size=int(config.get("window_size", 7)),
        embed_dim=int(config.get("embed_dim", 96)),
        depths=depths,
        num_heads=[int(h) for h in config.get("num_heads", (3, 6, 12, 24))],
        num_classes=num_classes,
    )
    if version == "v2":
        pretrained = [int(w) for w in config.get("pretrained_window_sizes") or [0] * len(depths)]
        options["pretrained_window_sizes"] = pretrained if any(pretrained) else 0
    defaults = dict(patch_size=4, in_chans=3, mlp_ratio=4.0, qkv_bias=True, ape=False)
    given = dict(patch_size=_pair(config.get("patch_size", 4))[0], in_chans=int(config.get("num_channels", 3)),
                 mlp_ratio=float(config.get("mlp_ratio", 4.0)), qkv_bias=bool(config.get("qkv_bias", True)),
                 ape=bool(config.get("use_absolute_embeddings", False)))
    if _pair(config.get("patch_size", 4))[0] != _pair(config.get("patch_size", 4))[1]:
        raise ValueError("the transformers config has a non-square patch_size: this package builds square patches")
    options.update({k: v for k, v in given.items() if v != defaults[k]})
    return {"name": _variant_name(version, options), "options": options}


def _variant_name(version: str, options: dict) -> str:
    """The named variant with the same width, depths and heads (tiny..large, V1 or V2), else the tiny one; the
    options override every architectural setting anyway, so the name only makes ``model.json`` readable."""
    best = None
    for name, variant in sorted(VARIANTS.items()):
        if variant["version"] != version or variant.get("extra_norm_every"):
            continue
        same = (variant["embed_dim"] == options["embed_dim"] and list(variant["depths"]) == options["depths"]
                and list(variant["num_heads"]) == options["num_heads"])
        score = (same, variant["window_size"] == options["window_size"], variant["img_size"] == options["img_size"])
        if best is None or score > best[0]:
            best = (score, name)
    if best is None or not best[0][0]:
        return "swinv2_tiny_window8_256" if version == "v2" else "swin_tiny_patch4_window7_224"
    return best[1]


def transformers_windows(config: dict) -> list[tuple[int, int]]:
    """Per block, the square (window, shift) transformers builds from ``config``.

    V2 fixes them at construction: stage sizes by floor division, the window clipped by the map's height only. V1
    sets them at run time: stage sizes by ceil division, clipped by the shorter side (a window that shrinks below
    the configured one then fails in transformers, see :func:`transformers_problems`).
    """
    grid = [s // p for s, p in zip(_pair(config["image_size"]), _pair(config["patch_size"]), strict=True)]
    window, out = int(config["window_size"]), []
    for i, depth in enumerate(config["depths"]):
        if config.get("model_type") == "swin":
            height, width = (-(-grid[0] // 2**i), -(-grid[1] // 2**i))
            side = min(height, width)
            win, shift = (side, 0) if side <= window else (window, window // 2)
        else:
            height = grid[0] // 2**i
            win = min(height, window)
            shift = 0 if height <= win else window // 2
        out += [(win, 0 if j % 2 == 0 else shift) for j in range(depth)]
    return out


def config_from_model(model: Any, window_size: Any, kind: str, labels: list[str] | None = None) -> dict:
    """transformers ``config.json`` settings (``Swinv2Config``/``SwinConfig`` keyword arguments plus
    ``model_type`` and ``architectures``) for our ``model``; ``window_size`` is the one it was built with (an int,
    or one entry per stage). Raises ``ValueError`` naming what transformers cannot express."""
    version = model.version
    blocks = [block for stage in model.layers for block in stage.blocks]
    window, pretrained = _expressible(model, window_size, kind)
    first = blocks[0] if blocks else None
    qkv_bias = bool(first is not None and (first.attn.q_bias is not None if version == "v2"
                                           else first.attn.qkv.bias is not None))
    mlp_ratio = first.mlp.fc1.out_features / first.mlp.fc1.in_features if first is not None else 4.0
    size = model.img_size
    merges = sum(stage.downsample is not None for stage in model.layers)
    config: dict[str, Any] = dict(
        model_type="swinv2" if version == "v2" else "swin",
        architectures=[ARCHITECTURES[(version, kind)]],
        image_size=size[0] if size[0] == size[1] else list(size),
        patch_size=model.patch_size,
        num_channels=model.patch_embed.in_chans,
        embed_dim=model.embed_dim,
        depths=list(model.depths),
        num_heads=[stage.blocks[0].attn.num_heads for stage in model.layers],
        window_size=window,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        use_absolute_embeddings=model.absolute_pos_embed is not None,
        encoder_stride=model.patch_size * 2**merges,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if version == "v2":
        config["pretrained_window_sizes"] = [p[0] if p is not None else 0 for p in pretrained]
    if kind == "classifier":
        classes = model.num_classes
        names = labels if labels and len(labels) == classes else [f"LABEL_{i}" for i in range(classes)]
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
    theirs = transformers_windows(config)
    ours = [(b.window, b.shift) for b in blocks]
    for i, ((win, shift), (our_win, our_shift)) in enumerate(zip(theirs, ours, strict=True)):
        if (win, win) != tuple(our_win) or (shift, shift) != tuple(our_shift):
            raise ValueError(
                f"transformers would give block {i} a window of {win} shifted by {shift} where the model uses "
                f"{tuple(our_win)} shifted by {tuple(our_shift)} (it clips windows to small or non-square stages "
                "differently): export a model whose every stage is at least as large as its window on both sides")
    if version == "v1":
        grid = [s // model.patch_size for s in size]
        small = [i for i in range(len(model.depths)) if min(-(-g // 2**i) for g in grid) < window]
        if small:
            raise ValueError(f"stage {small[0]} of the model is smaller than its window {window}, which transformers' "
                             "Swin V1 fails on: export a model whose stages are at least as large as the window")
    return config


def _expressible(model: Any, window_size: Any, kind: str) -> tuple[int, list]:
    """The one square window and the V2 pretrained windows of ``model``; ``ValueError`` naming what transformers'
    Swin cannot express (see :func:`config_from_model`)."""
    version = model.version
    blocks = [block for stage in model.layers for block in stage.blocks]
    one_pair = (isinstance(window_size, (list, tuple)) and len(window_size) == 2 and len(model.depths) != 2
                and all(isinstance(w, int) for w in window_size))  # one (h, w) for every stage, as the model reads it
    windows = window_size if isinstance(window_size, (list, tuple)) and not one_pair else [window_size]
    pairs = {_pair(w) for w in windows}
    if len(pairs) != 1 or len(set(next(iter(pairs)))) != 1:
        raise ValueError(f"the model has window_size {window_size!r} but transformers' Swin takes one square window "
                         "for every stage: export a model built with a single int window_size")
    window = next(iter(pairs))[0]
    if any(b.extra_norm is not None for b in blocks):
        raise ValueError("transformers' Swin has no extra main-branch LayerNorm (extra_norm_every, used by SwinV2-H/G, "
                         "arXiv 2111.09883 sec. 3.1), so it cannot express this model: export one with "
                         "extra_norm_every=0")
    if version == "v2" and model.absolute_pos_embed is not None:
        raise ValueError("transformers' Swin V2 cannot add an absolute position embedding (its forward fails on the "
                         "extra row it keeps): export a V2 model built with ape=False")
    if isinstance(model.patch_embed.norm, torch.nn.Identity):
        raise ValueError("transformers' Swin always normalises the patch embedding: export a model built with "
                         "patch_norm=True")
    pretrained = [b.attn.pretrained_window for b in (s.blocks[0] for s in model.layers if len(s.blocks))] \
        if version == "v2" else []
    if any(p is not None and p[0] != p[1] for p in pretrained):
        raise ValueError(f"the model's pretrained windows {pretrained} are not square, which transformers' Swin V2 "
                         "cannot express: export a model with square pretrained_window_sizes")
    if kind == "simmim" and model.img_size[0] != model.img_size[1]:
        raise ValueError(f"transformers' masked-image-modelling Swin takes square images only, and the model was "
                         f"built for {model.img_size[0]}x{model.img_size[1]}: export it as a backbone instead")
    return window, pretrained
