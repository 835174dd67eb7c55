"""Reading DeepSpeed checkpoints without running code from them.

DeepSpeed reads its own files (``engine.load_checkpoint``, ``zero_to_fp32``, ``ds_to_universal``) with
``torch.load(weights_only=False)``: unpickling such a file runs whatever it names, so a crafted
``mp_rank_00_model_states.pt`` in a checkpoint folder would execute its payload. Inside :func:`weights_only_loads`
every ``torch.load`` is weights-only (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides the callers' argument),
with only the few plain-data classes DeepSpeed's own files hold allow-listed; anything else is refused with
:class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..layouts import unpickling_refused

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than tensors and plain data (unpickling it could run code)."""


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed 0.19 pickles into its checkpoints (measured on ZeRO 0-3 files): plain data, no code.

    A ZeRO stage enum, the loss scaler's numbers and the (numel, start) pairs of ZeRO-1/2 fragments.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextmanager
def weights_only_loads(what: str | os.PathLike) -> Iterator[None]:
    """Make every ``torch.load`` inside weights-only (DeepSpeed's too); a refused file raises
    :class:`UnsafeCheckpointError` naming ``what`` (the checkpoint being read)."""
    previous = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(f"{unpickling_refused(what, error)}: use checkpoints written by this project or "
                                    "weights saved as .safetensors") from None
    finally:
        if previous is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = previous


def check_weights_only(checkpoint: str | os.PathLike) -> None:
    """Read every ``.pt`` file of a DeepSpeed checkpoint folder weights-only (memory-mapped: the pickles, not the
    tensor bytes), so that a file that would run code is refused, naming the checkpoint, before a converter that
    runs elsewhere (a subprocess) reads it."""
    with weights_only_loads(checkpoint):
        for file in sorted(Path(checkpoint).glob("*.pt")):
            torch.load(file, map_location="cpu", mmap=True, weights_only=True)


def run_module_weights_only(module: str) -> None:
    """``python -m module`` (with the current ``sys.argv``) under :func:`weights_only_loads`; for DeepSpeed's
    converters run as a subprocess (their forked workers inherit the allow-list). A refused file ends the process
    with one ``error:`` line naming the ``--input_folder`` checkpoint, and exit status 2."""
    import runpy

    argv = sys.argv[1:]
    what = argv[argv.index("--input_folder") + 1] if "--input_folder" in argv[:-1] else Path.cwd()
    try:
        with weights_only_loads(what):
            sys.argv[0] = module
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except UnsafeCheckpointError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
