"""Write an image folder or file list as webdataset shards with a dataset.json index.

    python launch/make_shards.py SRC OUT_PATTERN [--max-samples N] [--max-bytes N] [--resize N]
                                 [--quality Q] [--workers N] [--shuffle-seed S]

SRC: a folder with one subfolder per class (labels = sorted folder names), a flat folder (no labels), or a
text/CSV file of ``path[,label]`` lines. OUT_PATTERN: e.g. ``shards/train/train-%06d.tar`` (one folder per
split). ``--resize 256`` re-encodes every image larger than that as JPEG with a 256 px shorter side, which
makes 192-224 px training decode several times faster. The logic lives in ``swinv2.data.shards``.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..data.shards import write_shards
from . import FILE_ERRORS, run_command


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 500M or 1G") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="image folder (class subfolders or flat) or a text/CSV file list path[,label]")
    parser.add_argument("out_pattern", help="output shard names, e.g. shards/train/train-%%06d.tar")
    parser.add_argument("--max-samples", type=int, default=10000, help="samples per shard (default 10000)")
    parser.add_argument("--max-bytes", type=_size, default=2**30, help="bytes per shard, e.g. 500M (default 1G)")
    parser.add_argument("--resize", type=int, default=None, metavar="N",
                        help="re-encode as JPEG with the shorter side at most N px (default: keep original bytes)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding (default 90)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes reading and re-encoding images (default: min(8, CPUs))")
    parser.add_argument("--shuffle-seed", type=int, default=None, help="shuffle the sample order with this seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _prog() -> str:
    """The name argparse gives the command (``make_shards.py``, ``swinv2-make-shards``): errors start with it."""
    return os.path.basename(sys.argv[0])


def _make_shards(argv: list[str] | None) -> int:
    args = parse_args(argv)
    try:
        summary = write_shards(args.src, args.out_pattern, max_samples=args.max_samples, max_bytes=args.max_bytes,
                               resize=args.resize, quality=args.quality, workers=args.workers,
                               shuffle_seed=args.shuffle_seed, progress=not args.quiet)
    except FileNotFoundError:
        raise  # a missing source: the user's, one sentence and exit 2 from the guard
    except OSError as exn:  # the disk failed mid-run: complete shards stay, no index
        print(f"{_prog()}: writing failed ({exn}); no half shard is left, re-run the command.", file=sys.stderr)
        return 1
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``swinv2-make-shards`` / ``launch/make_shards.py``: the exit status (2 for a bad option or source)."""
    # No checkpoints here (their error types would load DeepSpeed); a failed shard write is handled above.
    return run_command(_make_shards, argv, user_errors=FILE_ERRORS, write_errors=(), prog=_prog())
