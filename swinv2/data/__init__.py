"""Data: write image collections as webdataset shards, stream them to every rank, and a built-in demo set.

- :func:`build_loader` -- the loader for SimMIM pretraining, fine-tuning or evaluation (see ``pipeline``).
- :class:`DataConfig` -- its options, embedded in the training config.
- :func:`expand_urls` -- brace patterns, folders, globs, ``pipe:``, ``s3://``, ``gs://``, ``http(s)://``.
- :func:`write_shards` -- an image folder or file list -> shards + ``dataset.json`` (``launch/make_shards.py``).
- :func:`demo_shards` -- the built-in demo data set, generated on first use.
"""

from __future__ import annotations

from .config import DataConfig
from .decode import decode_image
from .demo import DemoData, demo_shards
from .pipeline import ShardLoader, build_loader, resolve_rank
from .shards import ShardSummary, write_shards
from .urls import DataError, count_samples, expand_urls

__all__ = [
    "DataConfig",
    "DataError",
    "DemoData",
    "ShardLoader",
    "ShardSummary",
    "build_loader",
    "count_samples",
    "decode_image",
    "demo_shards",
    "expand_urls",
    "resolve_rank",
    "write_shards",
]
