"""DeepSpeed checkpoints out of training: consolidated fp32 weights and universal checkpoints."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from deepspeed.checkpoint.constants import (
    BUFFER_NAMES,
    FROZEN_PARAM_FRAGMENTS,
    GROUP_PADDINGS,
    OPTIMIZER_STATE_DICT,
    PARAM_SHAPES,
    PARTITION_COUNT,
    SINGLE_PARTITION_OF_FP32_GROUPS,
    ZERO_STAGE,
)

from .checkpoint_manager import MARKER, TAG, CheckpointManager
from .safe_load import check_weights_only, weights_only_loads


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

    ZeRO checkpoints go through DeepSpeed's ``zero_to_fp32``; those of its ``BF16_Optimizer`` (ZeRO-1 + bf16 with
    gradient accumulation), which that refuses ("is not a zero checkpoint"), through :func:`_bf16_optimizer_state_dict`.
    Every file is read weights-only (:mod:`.safe_load`): a file holding anything but tensors and plain data raises
    :class:`~.safe_load.UnsafeCheckpointError` (a ``ValueError``) without being unpickled.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder, tag = locate(path)
    optim_files = sorted((folder / tag).glob("*optim_states.pt"), key=_rank_of)
    with weights_only_loads(folder / tag):
        if optim_files:
            optim = [torch.load(f, map_location="cpu", mmap=True, weights_only=True)[OPTIMIZER_STATE_DICT]
                     for f in optim_files]
            if ZERO_STAGE in optim[0]:
                del optim  # zero_to_fp32 reads the files itself
                state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
            else:
                state = _bf16_optimizer_state_dict(folder / tag, optim)
        else:  # ZeRO stage 0 in fp32: the module weights are the master weights
            model_file = folder / tag / "mp_rank_00_model_states.pt"
            if not model_file.is_file():
                raise FileNotFoundError(f"checkpoint {str(folder / tag)!r} has no {model_file.name}: it is not a "
                                        "DeepSpeed checkpoint; pass a run directory or a step* folder")
            state = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}


def _rank_of(file: Path) -> int:
    """The data-parallel rank in a ZeRO file name (``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt``)."""
    match = re.search(r"zero_pp_rank_(\d+)_", file.name)
    return int(match.group(1)) if match else -1


def _bf16_optimizer_state_dict(checkpoint: Path, optim: list[dict]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ``BF16_Optimizer`` checkpoint (DeepSpeed 0.19, ``runtime/bf16_optimizer.py``).

    Per parameter group the optimizer flattens the group's parameters in order (``param_shapes`` of the model file,
    written from its ``bf16_groups``), pads the flat tensor to a multiple of ``2 x world`` elements and keeps the fp32
    copy of one equal partition per rank (``single_partition_of_fp32_groups``, its file ``optimizer_state_dict``;
    ``group_paddings`` holds the padding, counted on the last rank). So the ranks' partitions, concatenated, are the
    group's flat fp32 weights; buffers come from the model file as ``zero_to_fp32`` takes them.
    """
    partition_counts = optim[0][PARTITION_COUNT]
    world = max(partition_counts) if isinstance(partition_counts, list) else int(partition_counts)
    if len(optim) != world:
        raise ValueError(f"checkpoint {str(checkpoint)!r} has {len(optim)} optimizer state files for {world} ranks: "
                         "a rank's file is missing or belongs to another run; pass an earlier checkpoint")
    model_file = checkpoint / "mp_rank_00_model_states.pt"
    model = torch.load(model_file, map_location="cpu", weights_only=True)
    state = {k: v for k, v in model["module"].items() if k in set(model[BUFFER_NAMES])}
    for group, shapes in enumerate(model[PARAM_SHAPES]):
        flat = torch.cat([rank[SINGLE_PARTITION_OF_FP32_GROUPS][group] for rank in optim])
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            state[name] = flat.narrow(0, offset, numel).view(shape)
            offset += numel
        padding = optim[-1][GROUP_PADDINGS][group]
        if offset + padding != flat.numel():
            raise ValueError(f"checkpoint {str(checkpoint)!r}: parameter group {group} holds {flat.numel()} fp32 "
                             f"elements over {world} ranks, its parameters {offset} plus {padding} padding: the files "
                             "do not belong together; pass an earlier checkpoint")
    for name, frozen in (model.get(FROZEN_PARAM_FRAGMENTS) or {}).items():  # not trained: saved whole
        state[name] = frozen
    for name, source in model.get("shared_params", {}).items():
        if source in state:
            state[name] = state[source]
    return state


def to_universal(path: str | os.PathLike) -> Path:
    """Convert a checkpoint to DeepSpeed's universal format (``<tag>_universal``) so a run resumes at another
    world size; the resumed run picks it up by itself."""
    folder, tag = locate(path)
    check_weights_only(folder / tag)  # DeepSpeed's converter runs in a subprocess: refuse a bad file here, by name
    CheckpointManager(folder, keep_last=0, rank=0).ensure_universal(tag)
    return folder / f"{tag}_universal"
