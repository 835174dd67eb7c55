"""Writes that are never left half-done: a temporary name in the same folder, then an atomic rename.

:class:`AtomicPath` is the one way this repository publishes a file or a folder; the functions below are its
common uses.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import torch


class AtomicPath:
    """A temporary name beside ``path`` (same folder, so same file system) that becomes ``path`` by one rename.

    As a context manager it yields the temporary path, renames it to ``path`` when the block succeeds and removes
    it (file or folder) when the block raises::

        with AtomicPath(out / "grid.png") as tmp:
            image.save(tmp, format="PNG")

    Writers that span several calls use :meth:`commit` and :meth:`discard` instead. ``temp`` names the temporary
    path (default ``.<name>.tmp``); the folder of ``path`` is created.
    """

    def __init__(self, path: str | os.PathLike, temp: str | os.PathLike | None = None):
        self.path = Path(path)
        self.temp = Path(temp) if temp is not None else self.path.with_name(f".{self.path.name}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def commit(self) -> Path:
        """Rename the temporary path to ``path`` (replacing a file, or an empty folder, of that name)."""
        os.replace(self.temp, self.path)
        return self.path

    def discard(self) -> None:
        """Remove the temporary path, file or folder, if it is still there."""
        if self.temp.is_dir() and not self.temp.is_symlink():
            shutil.rmtree(self.temp, ignore_errors=True)
        else:
            self.temp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.temp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary path)``, then rename the result to ``path``; nothing is left behind if it raises."""
    with AtomicPath(path) as tmp:
        write(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` (creating its folder) via ``.<name>.tmp`` and a rename."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def default_file_mode() -> int:
    """The mode a new file gets from the user's umask (``0o644`` under the usual ``022``)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` as safetensors (optionally with string ``metadata``) via a temporary name and a rename."""
    from safetensors.torch import save_file

    with AtomicPath(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, default_file_mode())  # safetensors creates it with mode 0600
    return Path(path)
