"""DeepSpeed checkpoints out of training: consolidated fp32 weights, the encoder alone, universal checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpointing import MARKER, TAG, CheckpointManager
from .files import save_safetensors  # noqa: F401  (part of this module's API)
from .safe_load import weights_only_loads


def locate(path: str | os.PathLike) -> tuple[Path, str]:
    """``(checkpoints folder, tag)`` from a run directory, its ``checkpoints`` folder or one checkpoint's folder.

    The newest complete checkpoint is taken unless a checkpoint folder itself is given.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist: pass a run directory or a DeepSpeed checkpoint")
    if TAG.match(path.name) and path.is_dir():
        if not (path / MARKER).is_file():
            raise ValueError(f"checkpoint {str(path)!r} is incomplete (no {MARKER}; its write was interrupted): "
                             "pass an earlier one")
        return path.parent, path.name
    for folder in (path / "checkpoints", path):
        tags = CheckpointManager(folder, keep_last=0, rank=0).complete_tags()
        if tags:
            return folder, tags[-1]
    raise FileNotFoundError(f"no complete checkpoint under {str(path)!r}: pass a run directory with a checkpoints "
                            "folder, or a step* checkpoint folder")


def consolidated_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All weights of a (possibly ZeRO-partitioned, bf16/fp16) DeepSpeed checkpoint as one fp32 state dict.

    Every file is read weights-only (:mod:`.safe_load`): a file holding anything but tensors and plain data raises
    :class:`~.safe_load.UnsafeCheckpointError` (a ``ValueError``) without being unpickled.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder, tag = locate(path)
    optim_files = list((folder / tag).glob("*optim_states.pt"))
    with weights_only_loads(folder / tag):
        if optim_files:
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        else:  # ZeRO stage 0 in fp32: the module weights are the master weights
            model_file = folder / tag / "mp_rank_00_model_states.pt"
            if not model_file.is_file():
                raise FileNotFoundError(f"checkpoint {str(folder / tag)!r} has no {model_file.name}: it is not a "
                                        "DeepSpeed checkpoint; pass a run directory or a step* folder")
            state = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}


def encoder_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone of a SimMIM state dict (``encoder.*``, mask token and decoder dropped), as swinv2 loads it."""
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        raise ValueError("the checkpoint has no encoder.* weights: it is not a SimMIM checkpoint")
    return encoder


def to_universal(path: str | os.PathLike) -> Path:
    """Convert a checkpoint to DeepSpeed's universal format (``<tag>_universal``) so a run resumes at another
    world size; the resumed run picks it up by itself."""
    folder, tag = locate(path)
    CheckpointManager(folder, keep_last=0, rank=0).ensure_universal(tag)
    return folder / f"{tag}_universal"
