"""Turn what a user writes for "the shards" into the concrete list of URLs webdataset can open.

Accepted, alone or joined with ``::`` or given as a list:

- brace patterns ``shards/train-{000000..001023}.tar`` (local, remote or inside a ``pipe:`` command);
- a local folder (every ``*.tar`` / ``*.tar.gz`` / ``*.tgz`` in it, sorted) or a glob ``shards/*.tar``;
- ``pipe:COMMAND`` (the command writes one tar to stdout), passed through;
- ``s3://bucket/key.tar`` -> ``pipe:aws s3 cp s3://bucket/key.tar -`` (webdataset has no s3 handler);
- ``gs://bucket/key.tar`` -> ``pipe:gsutil cat gs://bucket/key.tar``;
- ``http(s)://`` passed through (webdataset reads them with curl);
- ``demo:train`` / ``demo:val``: the built-in demo shards (generated on first use).

Local shards are checked up front so that a typo ends in one sentence at start-up, not mid-epoch in a worker.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import braceexpand

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_REMOTE = ("http://", "https://", "pipe:")


class DataError(ValueError):
    """Data settings that cannot work (no shards, an empty folder, an unknown scheme), in one sentence."""


class MissingShardsError(DataError, FileNotFoundError):
    """Local shards that are not there (also a ``FileNotFoundError``)."""


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand ``spec`` (see the module docstring) into a non-empty list of URLs webdataset can open.

    Raises ``FileNotFoundError`` naming the pattern when a local shard, folder or glob finds nothing, and
    ``ValueError`` when the spec is empty.
    """
    parts = spec.split("::") if isinstance(spec, str) else list(spec)
    parts = [p.strip() for p in parts if p and p.strip()]
    if not parts:
        raise DataError("no shard URLs were given; set them to a pattern such as shards/train-{000000..000099}.tar, "
                         "a folder of .tar shards, or demo:train.")
    urls: list[str] = []
    for part in parts:
        urls.extend(_expand_one(part))
    return urls


def _expand_one(pattern: str) -> list[str]:
    if pattern.startswith("demo:"):
        from .demo import demo_shards  # imported lazily: generating demo data is only needed when asked for

        split = pattern[len("demo:"):]
        data = demo_shards()
        if split not in ("train", "val"):
            raise DataError(f"unknown demo split in {pattern!r}; use demo:train or demo:val.")
        return list(data.train_urls if split == "train" else data.val_urls)
    if pattern.startswith(_REMOTE):
        return list(braceexpand.braceexpand(pattern))
    if pattern.startswith("s3://"):
        return [f"pipe:aws s3 cp {shlex.quote(u)} -" for u in braceexpand.braceexpand(pattern)]
    if pattern.startswith("gs://"):
        return [f"pipe:gsutil cat {shlex.quote(u)}" for u in braceexpand.braceexpand(pattern)]
    if "://" in pattern and not pattern.startswith("file://"):
        scheme = pattern.split("://", 1)[0]
        raise DataError(f"shard URL scheme {scheme!r} in {pattern!r} is not supported; use a local path, "
                         "s3://, gs://, http(s):// or a pipe: command that writes the tar to stdout.")
    return _expand_local(pattern.removeprefix("file://"), pattern)


def _expand_local(path: str, pattern: str) -> list[str]:
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        found = sorted(str(p) for p in Path(path).iterdir() if p.name.endswith(SHARD_SUFFIXES) and p.is_file())
        if not found:
            raise MissingShardsError(f"folder {pattern!r} holds no .tar shards; write some with "
                                    "launch/make_shards.py or point at the folder that has them.")
        return found
    urls: list[str] = []
    missing: list[str] = []
    for item in braceexpand.braceexpand(path):
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                missing.append(item)
            urls.extend(matches)
        elif os.path.isfile(item):
            urls.append(item)
        else:
            missing.append(item)
    if missing:
        what = f"shard {missing[0]!r}" if len(missing) == 1 else f"{len(missing)} shards (first: {missing[0]!r})"
        raise MissingShardsError(f"{what} from {pattern!r} not found; check the path and the brace range "
                                "or write the shards with launch/make_shards.py.")
    return urls


def count_samples(urls: Sequence[str]) -> int | None:
    """Total samples in local ``urls`` according to the ``dataset.json`` files beside them, else ``None``.

    ``None`` when any URL is remote or is not listed in a ``dataset.json`` (written by ``make_shards.py``).
    """
    sizes = shard_sizes(urls)
    if any(url not in sizes for url in urls):
        return None
    return sum(sizes[url] for url in urls)


def shard_sizes(urls: Sequence[str]) -> dict[str, int]:
    """``{url: samples}`` for the local shards among ``urls`` that a ``dataset.json`` beside them lists."""
    cache: dict[str, dict[str, int]] = {}
    sizes = {}
    for url in urls:
        if url.startswith(_REMOTE) or "://" in url:
            continue
        folder, name = os.path.split(os.path.abspath(url))
        if folder not in cache:
            cache[folder] = _shard_counts(Path(folder) / "dataset.json")
        if name in cache[folder]:
            sizes[url] = cache[folder][name]
    return sizes


def _shard_counts(index: Path) -> dict[str, int]:
    try:
        meta = json.loads(index.read_text())
        return {s["name"]: int(s["samples"]) for s in meta["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def check_readable(urls: Sequence[str], setting: str, timeout: float = 30.0) -> None:
    """Read the first bytes of the first remote URL among ``urls`` (``http(s)://`` through curl, as webdataset
    reads it, or a ``pipe:`` command), so that an unreachable host or a failing command ends in one sentence naming
    ``setting`` at start-up instead of a traceback from a loader worker. Local shards are checked by
    :func:`expand_urls`."""
    url = next((u for u in urls if u.startswith(_REMOTE)), None)
    if url is None:
        return
    command = url[len("pipe:"):] if url.startswith("pipe:") else \
        f"curl -f -s -L --max-time {int(timeout)} {shlex.quote(url)}"
    got: list[bytes] = []
    with subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          start_new_session=True) as proc:
        reader = threading.Thread(target=lambda: got.append(proc.stdout.read(512)), daemon=True)
        reader.start()
        reader.join(timeout)
        if proc.poll() is None:  # still downloading (or hanging): the first bytes are all we wanted
            os.killpg(proc.pid, signal.SIGKILL)
    if not got or not got[0]:
        why = f"nothing within {timeout:.0f} s" if not got else f"exit status {proc.returncode} and no data"
        raise DataError(f"{setting}: could not read {url} ({why}); check the URL or command and the network, "
                        "or use local shards.")
