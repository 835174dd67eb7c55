"""Writes that are never left half-done: a temporary name in the same folder, then an atomic rename."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` (creating its folder) via ``.<name>.tmp`` and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def default_file_mode() -> int:
    """The mode a new file gets from the user's umask (``0o644`` under the usual ``022``)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` as safetensors (optionally with string ``metadata``) via a temporary name and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, default_file_mode())  # safetensors creates it with mode 0600
    os.replace(tmp, path)
    return path
