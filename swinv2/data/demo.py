"""The built-in demo data: small labelled images of procedurally drawn shapes, textures and gradients.

``demo_shards()`` generates the set on first use (deterministically, in a few seconds) into a cache folder,
``~/.cache/swinv2/demo-<version>`` unless ``root`` or ``$SWINV2_DEMO_DIR`` names another, and returns its
shard paths. Ten classes, 2000 training and 500 validation images of 96-256 px, labels balanced; colours,
sizes and positions are random in every class, so a model has to learn shape and texture.

Colours are drawn as natural images have them: foreground and background differ mainly in lightness (one sign of
contrast in all three channels, with a little hue jitter), not by independent random channels. Version 1 drew the
two colours independently per channel; on it, SimMIM's pixel targets were dominated by inferring each channel's
contrast sign and its features ignored shape (benchmarks/RESULTS.md, "Does SimMIM pretraining pay off on the
demo?").

Several processes (DeepSpeed ranks) may call it at once: building happens in a private temporary folder
that is renamed into place (atomic), under a file lock where the file system offers one; whoever comes
second uses the finished set.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from ..files import AtomicPath
from .shards import ShardSink, encode_jpeg, write_index

VERSION = 2
CLASSES = ("circles", "squares", "triangles", "h_stripes", "v_stripes", "checkerboard", "gradient", "rings",
           "noise", "lines")
SPLITS = {"train": 2000, "val": 500}
SAMPLES_PER_SHARD = 250
QUALITY = 90
_SEED = 20240611


class DemoData(NamedTuple):
    """Shard paths of the two splits and the class names (label i is ``classes[i]``)."""

    train_urls: list[str]
    val_urls: list[str]
    classes: list[str]


def default_root() -> Path:
    """``$SWINV2_DEMO_DIR`` if set, else ``~/.cache/swinv2/demo-<version>``."""
    env = os.environ.get("SWINV2_DEMO_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "swinv2" / f"demo-{VERSION}"


def demo_shards(root: str | os.PathLike | None = None) -> DemoData:
    """The demo set's shards, generated into ``root`` (default :func:`default_root`) unless already there."""
    root = Path(root).expanduser() if root is not None else default_root()
    if not _complete(root):
        root.parent.mkdir(parents=True, exist_ok=True)
        with _lock(root.parent / f".{root.name}.lock"):
            if not _complete(root):
                _build_into(root)
    meta = json.loads((root / "demo.json").read_text())
    return DemoData(*(sorted(str(root / split / name) for name in meta["shards"][split]) for split in SPLITS),
                    list(meta["classes"]))


def _complete(root: Path) -> bool:
    try:
        return json.loads((root / "demo.json").read_text()).get("version") == VERSION
    except (OSError, ValueError, AttributeError):
        return False


@contextmanager
def _lock(path: Path):
    handle = None
    try:
        import fcntl

        handle = open(path, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
    except (ImportError, OSError):  # no locking here (e.g. some network file systems): the rename still protects
        if handle is not None:
            handle.close()
            handle = None
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing releases the lock


def _build_into(root: Path) -> None:
    # A folder of its own per process: several ranks may build at once.
    target = AtomicPath(root, temp=tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        build(target.temp)
        try:
            target.commit()  # atomic; fails if another process already put a complete set there
        except OSError:
            if not _complete(root):
                raise OSError(f"{str(root)!r} exists but holds no demo data of version {VERSION}; delete it or set "
                              "SWINV2_DEMO_DIR to another folder.") from None
    finally:
        target.discard()


def build(folder: str | os.PathLike) -> dict:
    """Write both splits as shards (with ``dataset.json`` each) and ``demo.json`` into ``folder``; return the latter."""
    folder = Path(folder)
    shards = {}
    for split_id, (split, count) in enumerate(SPLITS.items()):
        pattern = str(folder / split / f"{split}-%06d.tar")
        (folder / split).mkdir(parents=True, exist_ok=True)
        order = np.random.default_rng([_SEED, split_id]).permutation(count)
        with ShardSink(pattern, SAMPLES_PER_SHARD, 2**40, key_width=6) as sink:
            for index in range(count):
                label = int(order[index] % len(CLASSES))  # balanced: count / 10 of each, in shuffled order
                rng = np.random.default_rng([_SEED, split_id, index])
                image = DRAW[label](rng, *rng.integers(96, 257, size=2))
                sink.add({"jpg": encode_jpeg(image, None, QUALITY), "cls": str(label).encode()})
        options = dict(generator=f"swinv2.data.demo v{VERSION}", quality=QUALITY, max_samples=SAMPLES_PER_SHARD)
        write_index(pattern, dict(source="swinv2.data.demo", samples=sink.samples, shards=sink.shards,
                                  classes=list(CLASSES), options=options, skipped=[]))
        shards[split] = [s["name"] for s in sink.shards]
    meta = dict(version=VERSION, classes=list(CLASSES), splits=dict(SPLITS), shards=shards)
    (folder / "demo.json").write_text(json.dumps(meta, indent=1) + "\n")  # written last: marks the set complete
    return meta


# ------------------------------------------------------------------------------------------------ drawing


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A random background and a foreground 60-130 levels lighter or darker in every channel (+-25 hue jitter)."""
    bg = rng.integers(40, 216, size=3)
    shift = rng.uniform(60, 130) * rng.choice([-1, 1])
    fg = np.clip(bg + shift + rng.uniform(-25, 25, size=3), 0, 255).astype(np.int64)
    return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def _paint(mask: np.ndarray | Image.Image, bg, fg) -> Image.Image:
    """Mix two colours by ``mask`` (uint8 array or L image, 255 = foreground) into an RGB image."""
    mask = mask if isinstance(mask, Image.Image) else Image.fromarray(mask, "L")
    return Image.composite(Image.new("RGB", mask.size, fg), Image.new("RGB", mask.size, bg), mask)


def _shapes(kind: str) -> Callable:
    def draw(rng: np.random.Generator, w: int, h: int) -> Image.Image:
        bg, fg = _colours(rng)
        mask = Image.new("L", (w, h), 0)
        pen = ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(1, 4))):
            size = int(rng.integers(min(w, h) // 4, min(w, h) * 2 // 3))
            x, y = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
            if kind == "circles":
                pen.ellipse((x, y, x + size, y + size), fill=255)
            elif kind == "squares":
                pen.rectangle((x, y, x + size, y + size), fill=255)
            else:
                pen.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=255)
        return _paint(mask, bg, fg)

    return draw


def _pattern(kind: str) -> Callable:
    def draw(rng: np.random.Generator, w: int, h: int) -> Image.Image:
        bg, fg = _colours(rng)
        period = float(rng.uniform(8, 28))
        x = np.arange(w, dtype=np.float32)[None, :] + float(rng.uniform(0, period))  # (1, W)
        y = np.arange(h, dtype=np.float32)[:, None] + float(rng.uniform(0, period))  # (H, 1)
        if kind == "h_stripes":
            on = np.broadcast_to(y % period < period / 2, (h, w))
        elif kind == "v_stripes":
            on = np.broadcast_to(x % period < period / 2, (h, w))
        elif kind == "checkerboard":
            on = (x // period + y // period) % 2 == 0
        elif kind == "rings":
            cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
            on = np.hypot(x - cx, y - cy) % period < period / 2
        elif kind == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            t = x * np.cos(angle) + y * np.sin(angle)
            return _paint(((t - t.min()) * (255 / max(float(t.max() - t.min()), 1.0))).astype(np.uint8), bg, fg)
        else:  # noise: coarse random blocks, the only class without any structure
            cell = int(rng.integers(2, 6))
            blocks = rng.integers(0, 256, size=((h + cell - 1) // cell, (w + cell - 1) // cell), dtype=np.uint8)
            return _paint(np.ascontiguousarray(blocks.repeat(cell, 0).repeat(cell, 1)[:h, :w]), bg, fg)
        return _paint(np.where(on, np.uint8(255), np.uint8(0)), bg, fg)

    return draw


def _lines(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    bg, fg = _colours(rng)
    mask = Image.new("L", (w, h), 0)
    pen = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(2, 6))):
        x0, x1 = rng.integers(0, w, size=2)
        y0, y1 = rng.integers(0, h, size=2)
        pen.line((int(x0), int(y0), int(x1), int(y1)), fill=255, width=int(rng.integers(2, 7)))
    return _paint(mask, bg, fg)


DRAW: tuple[Callable, ...] = (
    _shapes("circles"), _shapes("squares"), _shapes("triangles"), _pattern("h_stripes"), _pattern("v_stripes"),
    _pattern("checkerboard"), _pattern("gradient"), _pattern("rings"), _pattern("noise"), _lines,
)
assert len(DRAW) == len(CLASSES)

