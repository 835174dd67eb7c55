"""Bytes from a shard -> an RGB PIL image (with JPEG draft decoding) and an optional integer label."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")


class SampleError(ValueError):
    """A sample that cannot be used (no image, no label, undecodable); the stream skips and counts it."""


def decode_image(data: bytes, min_side: int = 0) -> Image.Image:
    """Decode image bytes to RGB.

    For a JPEG whose shorter side is at least twice ``min_side``, libjpeg decodes at 1/2, 1/4 or 1/8 scale
    (``Image.draft``) while keeping both sides >= ``min_side``: several times less work when the image will be
    resized down anyway. ``min_side=0`` always decodes at full size.
    """
    img = Image.open(io.BytesIO(data))
    if min_side > 0 and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))
    img.load()  # the full decode: a truncated or corrupt file raises here rather than inside a transform
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_limit() -> int | None:
    """The most pixels an image may decode to: PIL's own decompression-bomb limit, twice ``Image.MAX_IMAGE_PIXELS``
    (about 179 M pixels, 537 MB as RGB); ``None`` when the user switched PIL's limit off."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def open_unchecked(data: bytes) -> Image.Image:
    """Open image bytes (the header only) without PIL's size check at open.

    For a caller that may reduce the decode first (``Image.draft``: a 20000 x 20000 JPEG decodes at 1/8 scale,
    2500 x 2500) and then checks the size that will really be decoded with :func:`check_pixels`.
    """
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # checked by the caller, on the size it will decode
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def check_pixels(size: tuple[int, int], original: tuple[int, int] | None = None) -> None:
    """Raise ``ValueError`` when decoding ``size`` pixels exceeds :func:`decode_limit`."""
    limit = decode_limit()
    if limit and size[0] * size[1] > limit:
        reduced = "" if original in (None, size) else f" (reduced from {original[0]} x {original[1]})"
        raise ValueError(f"{size[0]} x {size[1]} pixels{reduced} is more than the {limit} that are decoded at most "
                         "(2 x PIL.Image.MAX_IMAGE_PIXELS, its decompression-bomb limit)")


def image_bytes(sample: dict[str, Any]) -> bytes:
    """The image payload of a webdataset sample, whichever image extension it was stored under."""
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise SampleError(f"no image in sample (keys: {', '.join(k for k in sample if not k.startswith('__'))})")


def label_of(sample: dict[str, Any]) -> int:
    """The integer class label stored under ``cls``."""
    if "cls" not in sample:
        raise SampleError("no 'cls' label in sample (labelled data is needed for kind='train' and 'eval')")
    raw = sample["cls"]
    try:
        return int(raw.decode() if isinstance(raw, bytes) else raw)
    except ValueError:
        raise SampleError(f"label {raw[:20]!r} is not an integer") from None
