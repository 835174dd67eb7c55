"""Write an image collection as webdataset tar shards plus a ``dataset.json`` index (``launch/make_shards.py``).

Sources: an image folder (class subfolders -> integer labels in sorted name order, the names saved as
``classes``; a flat folder -> no labels) or a text/CSV file list of ``path[,label]`` lines (labels are
integers, or class names mapped to integers in sorted order). Samples are stored as ``<key>.<ext>`` with the
original bytes (``jpg``, ``png``, ...) or re-encoded as JPEG with the shorter side resized, plus ``<key>.cls``
when labelled; keys are the zero-padded sample index.

Nothing half-written is ever visible: each shard is written as ``<name>.partial`` and renamed when complete,
``dataset.json`` is written last and atomically, and a (re-)run first removes the index, the shards and the
stale ``.partial`` files of the same output pattern, so an interrupted run leaves only complete shards and no
index that could describe them wrongly. Only files this writer wrote are ever removed: those listed in the
folder's ``dataset.json`` or, for an interrupted run, in ``dataset.json.partial`` (the names a run is writing,
recorded before each shard is opened). A folder holding other files named like the pattern is refused.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..files import AtomicPath, write_text_atomic
from .decode import check_pixels, open_unchecked

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
# PIL format -> webdataset extension for originals kept as they are. MPO is what PIL calls many camera JPEGs.
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff",
              "PPM": "ppm"}
INDEX_NAME = "dataset.json"
PARTIAL = ".partial"
JOURNAL = INDEX_NAME + PARTIAL  # the shards a run is writing, so that a re-run after a crash may remove them
_BLOCK, _RECORD = 512, 10240  # tar block and record sizes (a closed tar is padded to whole records)


@dataclass
class ShardSummary:
    """What a run wrote: images, shards (paths), bytes on disk, skipped unreadable files (path, reason)."""

    images: int
    shards: list[str]
    bytes: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classes: list[str] | None = None
    index: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"wrote {self.images} images in {len(self.shards)} shards, {self.bytes / 2**20:.1f} MiB, "
                 f"in {self.seconds:.1f} s; index: {self.index}"]
        if self.classes is not None:
            lines.append(f"{len(self.classes)} classes: {', '.join(self.classes[:10])}"
                         + (", ..." if len(self.classes) > 10 else ""))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable files:")
            lines += [f"  {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the source


def list_source(src: str | os.PathLike) -> tuple[list[tuple[str, int | None]], list[str] | None]:
    """``([(path, label or None), ...], class names or None)`` for an image folder or a file list."""
    root = Path(src).expanduser()
    if root.is_dir():
        return _list_folder(root)
    if root.is_file():
        return _list_file(root)
    raise FileNotFoundError(f"source {str(src)!r} does not exist; give an image folder or a text/CSV file list.")


def _images_under(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
    return found


def _list_folder(root: Path) -> tuple[list[tuple[str, int | None]], list[str] | None]:
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    top = [str(p) for p in entries if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)]
    per_class = {p.name: _images_under(p) for p in entries if p.is_dir()}
    per_class = {name: files for name, files in per_class.items() if files}
    if per_class and top:
        raise ValueError(f"{str(root)!r} mixes {len(top)} image files with class folders; move the images into a "
                         "class folder, or give a flat folder or a file list instead.")
    if not per_class and not top:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {str(root)!r}.")
    if top:
        return [(p, None) for p in top], None
    classes = sorted(per_class)
    return [(p, label) for label, name in enumerate(classes) for p in per_class[name]], classes


def _list_file(listing: Path) -> tuple[list[tuple[str, int | None]], list[str] | None]:
    rows: list[tuple[int, str, str | None]] = []
    with listing.open(newline="") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            row = [c.strip() for c in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if not rows and row[0].lower() in ("path", "file", "filename", "image"):
                continue  # a header line
            if len(row) > 2:
                raise ValueError(f"line {number} of {str(listing)!r} has {len(row)} fields; expected path[,label].")
            path = row[0] if os.path.isabs(row[0]) else str(listing.parent / row[0])
            rows.append((number, path, row[1] if len(row) == 2 and row[1] else None))
    if not rows:
        raise ValueError(f"file list {str(listing)!r} names no images.")
    labelled = [r for r in rows if r[2] is not None]
    if labelled and len(labelled) != len(rows):
        bad = next(r for r in rows if r[2] is None)
        raise ValueError(f"line {bad[0]} of {str(listing)!r} has no label while other lines do; label every line "
                         "or none.")
    if not labelled:
        return [(p, None) for _, p, _ in rows], None
    names = [r[2] for r in rows]
    if all(re.fullmatch(r"\d+", n) for n in names):
        return [(p, int(n)) for (_, p, _), n in zip(rows, names, strict=True)], None
    classes = sorted(set(names))
    lookup = {name: i for i, name in enumerate(classes)}
    return [(p, lookup[n]) for (_, p, _), n in zip(rows, names, strict=True)], classes


# ------------------------------------------------------------------------------------------ reading, encoding


def prepare_image(job: tuple[str, int | None, int]) -> tuple[str | None, bytes | None, str | None]:
    """Read one image (in a pool worker): ``(ext, bytes, None)`` or ``(None, None, reason)`` when unreadable.

    Without ``resize`` the original bytes are kept after a full trial decode; with it, images whose shorter
    side exceeds ``resize`` (and non-JPEGs) are re-encoded as JPEG with that shorter side. No image decodes to more
    than :func:`~.decode.decode_limit` pixels; with ``resize`` a JPEG decodes at 1/2..1/8 scale first, so photos
    up to 64 times that (e.g. 20000 x 20000) are kept, reduced.
    """
    path, resize, quality = job
    try:
        with open(path, "rb") as f:
            data = f.read()
        img = open_unchecked(data)  # its size is checked below, once it is known how much will be decoded
        original = img.size
        ext = FORMAT_EXT.get(img.format or "")
        if ext is None or (resize and (ext != "jpg" or min(original) > resize)):
            if resize and img.format == "JPEG":
                img.draft("RGB", (resize, resize))  # decode a big JPEG at a reduced scale that still covers resize
            check_pixels(img.size, original)
            return "jpg", encode_jpeg(img, resize, quality), None
        try:
            check_pixels(original)  # kept as it is: the training pipeline decodes it whole
        except ValueError as error:
            raise ValueError(f"{error}; with --resize a JPEG is decoded reduced") from None
        if ext == "jpg":
            img.draft("RGB", (64, 64))  # the trial decode at 1/8 scale still reads every byte of the stream
        img.load()
        return ext, data, None
    except UnidentifiedImageError:
        return None, None, "not an image file PIL can read"
    except Exception as exn:  # any unreadable file is reported, never fatal
        return None, None, f"{type(exn).__name__}: {exn}"


def encode_jpeg(img: Image.Image, resize: int | None, quality: int) -> bytes:
    """RGB JPEG bytes of ``img`` with its shorter side reduced to ``resize`` (never enlarged)."""
    if resize and img.format == "JPEG":
        img.draft("RGB", (resize, resize))  # decode big JPEGs at a reduced scale that still covers resize
    img = img.convert("RGB")
    w, h = img.size
    if resize and min(w, h) > resize:
        size = (resize, max(resize, round(h * resize / w))) if w <= h else (max(resize, round(w * resize / h)), resize)
        img = img.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


@contextmanager
def _prepared(jobs: list[tuple[str, int | None, int]], workers: int) -> Iterator[Iterator]:
    if workers <= 1:
        yield map(prepare_image, jobs)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        # imap keeps the input order, so the shards do not depend on the number of workers.
        yield pool.imap(prepare_image, jobs, chunksize=8)


# ------------------------------------------------------------------------------------------ the shard files


def check_pattern(pattern: str) -> re.Match:
    """Validate an output pattern such as ``out/train-%06d.tar``; return the match of its file name."""
    match = re.fullmatch(r"([^%]*)%(0?\d*)d([^%]*)", os.path.basename(pattern))
    if not match:
        raise ValueError(f"output pattern {pattern!r} must hold exactly one integer field, e.g. out/train-%06d.tar.")
    if not match.group(3).endswith(".tar"):
        raise ValueError(f"output pattern {pattern!r} must end in .tar so that shard folders and globs find it.")
    return match


def _tar_size(member_bytes: int) -> int:
    """Size on disk of a closed tar whose members (headers + padded data) take ``member_bytes``."""
    return -(-(member_bytes + 2 * _BLOCK) // _RECORD) * _RECORD


class ShardSink:
    """Append samples (``{ext: bytes}``) to shards named by ``pattern``, starting a new shard at the limits.

    ``max_bytes`` bounds the size on disk of every shard that holds more than one sample. Use as a context
    manager: a clean exit completes the last shard, an exception removes the incomplete one.
    """

    def __init__(self, pattern: str, max_samples: int, max_bytes: int, key_width: int = 9, mtime: int = 946684800,
                 journal: bool = False):
        check_pattern(pattern)
        self.pattern, self.max_samples, self.max_bytes, self.journal = pattern, max_samples, max_bytes, journal
        # A fixed integer mtime makes shards reproducible byte for byte; a float one would add a pax header per file.
        self.key_width, self.mtime = key_width, int(mtime)
        self.shards: list[dict[str, Any]] = []
        self.samples = 0
        self._file = self._writer = None
        self._count = self._members = 0

    def add(self, payload: dict[str, bytes]) -> str:
        """Write one sample; returns its key."""
        need = sum(_BLOCK + -(-len(v) // _BLOCK) * _BLOCK for v in payload.values())
        if self._writer is not None and (self._count >= self.max_samples
                                         or _tar_size(self._members + need) > self.max_bytes):
            self._finish()
        if self._writer is None:
            self._start()
        key = f"{self.samples:0{self.key_width}d}"
        self._writer.write({"__key__": key, **payload})
        self._count, self._members, self.samples = self._count + 1, self._members + need, self.samples + 1
        return key

    def _start(self) -> None:
        final = self.pattern % len(self.shards)
        if self.journal:  # recorded before the file exists: whatever a crash leaves is listed as ours
            names = [s["name"] for s in self.shards] + [os.path.basename(final)]
            write_text_atomic(os.path.join(os.path.dirname(self.pattern), JOURNAL),
                              json.dumps({"pattern": os.path.basename(self.pattern), "shards": names}) + "\n")
        self._target = AtomicPath(final, temp=final + PARTIAL)
        self._file = open(self._target.temp, "wb")
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=self.mtime, user="swinv2", group="swinv2")

    def _finish(self) -> None:
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the rename must not publish a shard whose bytes are still in flight
        self._file.close()
        final = self._target.commit()
        self.shards.append({"name": final.name, "samples": self._count, "bytes": final.stat().st_size})
        self._file = self._writer = None
        self._count = self._members = 0

    def abort(self) -> None:
        """Drop the shard being written (its ``.partial`` file)."""
        if self._file is not None:
            self._file.close()
            self._target.discard()
            self._file = self._writer = None

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._writer is not None:
                self._finish()
        else:
            self.abort()

    def paths(self) -> list[str]:
        folder = os.path.dirname(self.pattern)
        return [os.path.join(folder, s["name"]) for s in self.shards]


def _written_by_us(folder: Path, pattern: str) -> set[str]:
    """The shard names this folder's ``dataset.json`` and ``dataset.json.partial`` list for ``pattern``.

    Refuses (``ValueError``) an index of a different pattern: each split needs its own folder, since
    ``dataset.json`` and folder URLs describe one split.
    """
    names: set[str] = set()
    for path in (folder / INDEX_NAME, folder / JOURNAL):
        if not path.exists():
            continue
        try:
            listing = json.loads(path.read_text())
            other, shards = listing.get("pattern"), [s if isinstance(s, str) else s["name"] for s in listing["shards"]]
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            continue  # unreadable: it vouches for nothing
        if other is None:
            continue
        if other != os.path.basename(pattern):
            raise ValueError(f"{str(folder)!r} already holds shards written as {other!r}; write each split into "
                             "its own folder.")
        names.update(str(name) for name in shards)
    return names


def clear_output(pattern: str) -> list[str]:
    """Make ``pattern``'s folder ready for a fresh run: remove its index and the shards and stale ``.partial``
    files it lists; return the removed paths.

    Refuses (``ValueError``, nothing removed) a folder holding files named like the pattern that no index of ours
    lists: they are someone else's (``%d.tar`` matches a user's ``2023.tar``).
    """
    match = check_pattern(pattern)
    folder = Path(os.path.dirname(pattern) or ".")
    ours = _written_by_us(folder, pattern)
    named = re.compile(re.escape(match.group(1)) + r"\d+" + re.escape(match.group(3)) + f"({re.escape(PARTIAL)})?")
    matching = sorted(p for p in folder.iterdir() if named.fullmatch(p.name))
    strangers = [p for p in matching if p.name.removesuffix(PARTIAL) not in ours]
    if strangers:
        raise ValueError(f"{str(folder)!r} holds {len(strangers)} file(s) named like the output pattern that "
                         f"make_shards did not write (e.g. {strangers[0].name!r}), which it will not overwrite or "
                         "delete; move them away or write into another folder.")
    for path in matching:
        path.unlink()
    (folder / INDEX_NAME).unlink(missing_ok=True)  # last: until here it lists what is left
    (folder / JOURNAL).unlink(missing_ok=True)
    return [str(p) for p in matching]


def prepare_folder(pattern: str) -> None:
    """Create the output folder and prove it writable, or raise ``ValueError`` in one sentence (nothing written)."""
    folder = Path(os.path.dirname(pattern) or ".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{INDEX_NAME}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"output folder {str(folder)!r} (or a folder above it) is an existing file: give a pattern "
                         "in a folder, e.g. shards/train/train-%06d.tar.") from None
    except OSError as error:
        raise ValueError(f"cannot write into output folder {str(folder)!r} ({error.strerror}): choose a folder you "
                         "can write to or fix its permissions.") from None


def write_index(pattern: str, meta: dict[str, Any]) -> str:
    """Write ``dataset.json`` beside the shards atomically (temporary file, then rename); return its path."""
    path = os.path.join(os.path.dirname(pattern), INDEX_NAME)
    text = json.dumps({"pattern": os.path.basename(pattern), **meta}, indent=1) + "\n"
    write_text_atomic(path, text)
    Path(path + PARTIAL).unlink(missing_ok=True)  # the index now lists every shard
    return path


# ------------------------------------------------------------------------------------------------- the run


def check_options(max_samples: int, max_bytes: int, resize: int | None, quality: int, workers: int) -> None:
    """Raise ``ValueError`` with one sentence per bad option."""
    bad = []
    if max_samples < 1:
        bad.append(f"--max-samples must be at least 1, got {max_samples}.")
    if max_bytes < 4 * _RECORD:
        bad.append(f"--max-bytes must be at least {4 * _RECORD} (a few tar records), got {max_bytes}.")
    if resize is not None and resize < 16:
        bad.append(f"--resize must be at least 16 pixels, got {resize}.")
    if not 1 <= quality <= 100:
        bad.append(f"--quality must be in 1..100, got {quality}.")
    if workers < 0:
        bad.append(f"--workers must be 0 or more, got {workers}.")
    if bad:
        raise ValueError(" ".join(bad))


def write_shards(src: str | os.PathLike, pattern: str, *, max_samples: int = 10000, max_bytes: int = 2**30,
                 resize: int | None = None, quality: int = 90, workers: int = 0, shuffle_seed: int | None = None,
                 progress: bool = True) -> ShardSummary:
    """Write the images of ``src`` (folder or file list) to shards named ``pattern`` and index them.

    ``workers`` > 1 reads (and re-encodes) in that many processes; ``shuffle_seed`` shuffles the sample order
    reproducibly. Unreadable files are skipped and listed in the summary and ``dataset.json``.
    """
    check_options(max_samples, max_bytes, resize, quality, workers)
    check_pattern(pattern)
    start = time.perf_counter()
    items, classes = list_source(src)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    prepare_folder(pattern)
    clear_output(pattern)
    skipped: list[tuple[str, str]] = []
    jobs = [(path, resize, quality) for path, _ in items]
    bar = tqdm(total=len(items), unit="img", desc="writing shards", disable=not progress)
    with _prepared(jobs, workers) as results, ShardSink(pattern, max_samples, max_bytes,
                                                        key_width=max(6, len(str(len(items)))), journal=True) as sink:
        for (path, label), (ext, data, error) in zip(items, results, strict=True):
            bar.update()
            if error is not None:
                skipped.append((path, error))
                continue
            payload = {ext: data} if label is None else {ext: data, "cls": str(label).encode()}
            sink.add(payload)
    bar.close()
    options = dict(max_samples=max_samples, max_bytes=max_bytes, resize=resize, quality=quality,
                   shuffle_seed=shuffle_seed, workers=workers)
    index = write_index(pattern, dict(source=str(Path(src).expanduser().resolve()), samples=sink.samples,
                                      shards=sink.shards, classes=classes, options=options,
                                      skipped=[{"path": p, "error": e} for p, e in skipped]))
    return ShardSummary(images=sink.samples, shards=sink.paths(), bytes=sum(s["bytes"] for s in sink.shards),
                        skipped=skipped, classes=classes, index=index, seconds=time.perf_counter() - start)
