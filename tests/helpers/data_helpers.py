"""Real images and real tar shards for the data tests, written with PIL and the standard tarfile module
(independently of swinv2.data's own writer, so reading and writing are checked against each other)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"blue": (20, 30, 230), "green": (20, 220, 40), "red": (230, 30, 20)}  # sorted names: labels 0, 1, 2


def image_bytes(colour, size=(120, 90), fmt="JPEG", seed=0) -> bytes:
    """A solid-colour image with a little noise (so JPEG has real work to do)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(colour, np.int16) + rng.integers(-10, 11, size=(size[1], size[0], 3)), 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(out, fmt)
    return out.getvalue()


def make_class_folder(root: Path, per_class: int = 5) -> dict[str, list[Path]]:
    """``root/<colour>/`` with JPEGs and PNGs of that colour, of varying sizes; returns the files per class."""
    files: dict[str, list[Path]] = {}
    for c, (name, colour) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        files[name] = []
        for i in range(per_class):
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            path = root / name / f"img{i}.{ext}"
            path.write_bytes(image_bytes(colour, (96 + 16 * i, 80 + 8 * c), fmt, seed=10 * c + i))
            files[name].append(path)
    return files


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A webdataset shard: members ``<key>.<ext>`` in sample order."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def labelled_shards(folder: Path, sizes: list[int], prefix: str = "s") -> tuple[list[str], dict[str, int]]:
    """Shards of ``sizes`` samples with globally unique keys; returns the paths and key -> label."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels, n = [], {}, 0
    jpeg = {c: image_bytes(colour, (40, 32)) for c, colour in enumerate(COLOURS.values())}
    for s, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            key, label = f"{n:06d}", n % 3
            samples.append((key, {"jpg": jpeg[label], "cls": str(label).encode()}))
            labels[key] = label
            n += 1
        paths.append(str(write_tar(folder / f"{prefix}-{s:04d}.tar", samples)))
    return paths, labels


def shard_members(path: str | Path) -> dict[str, bytes]:
    """Every member of a tar, name -> bytes."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
