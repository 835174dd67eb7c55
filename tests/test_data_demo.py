"""The built-in demo data: deterministic to the byte, balanced, readable by the loader, safe to build from
several processes at once."""

from __future__ import annotations

import io
import multiprocessing
import time
from collections import Counter
from pathlib import Path

import pytest
from data_helpers import shard_members
from PIL import Image

from swinv2.data import DataConfig, build_loader, demo_shards, expand_urls
from swinv2.data.demo import CLASSES, SPLITS


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo") / "set"


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_generated_quickly_and_identically_twice(demo_root, tmp_path):
    start = time.perf_counter()
    first = demo_shards(demo_root)
    seconds = time.perf_counter() - start
    assert seconds < 20, f"demo generation took {seconds:.1f} s"  # ~3 s here; generous for slow CI machines
    second = demo_shards(tmp_path / "again")
    assert _all_bytes(demo_root) == _all_bytes(tmp_path / "again")
    assert len(first.train_urls) == len(second.train_urls) == 8 and len(first.val_urls) == 2
    assert first.classes == list(CLASSES)


def test_demo_labels_are_balanced_and_images_sized_96_to_256(demo_root):
    data = demo_shards(demo_root)  # already built by the test above, or built now
    for split, urls in (("train", data.train_urls), ("val", data.val_urls)):
        labels: Counter = Counter()
        for url in urls:
            members = shard_members(url)
            labels.update(int(v) for k, v in members.items() if k.endswith(".cls"))
            for name, data_bytes in list(members.items())[:20]:
                if name.endswith(".jpg"):
                    assert all(96 <= side <= 256 for side in Image.open(io.BytesIO(data_bytes)).size)
        assert labels == {label: SPLITS[split] // len(CLASSES) for label in range(len(CLASSES))}


def test_demo_urls_feed_the_loader(demo_root, monkeypatch):
    demo_shards(demo_root)
    monkeypatch.setenv("SWINV2_DEMO_DIR", str(demo_root))
    assert expand_urls("demo:val") == demo_shards(demo_root).val_urls
    cfg = DataConfig(eval_urls="demo:val", batch_size=50, num_workers=2)
    loader = build_loader(cfg, "eval", rank=0, world_size=1, img_size=64)
    assert sum(len(b["key"]) for b in loader) == loader.expected_samples == 500 and loader.skipped == 0


def _build(root, queue):
    queue.put(demo_shards(root))


def test_concurrent_first_use_builds_once_and_all_callers_agree(tmp_path):
    ctx = multiprocessing.get_context("fork")  # fork: no re-import of torch in the children
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build, args=(tmp_path / "shared", queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r == results[0] for r in results)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["shared"]  # no temp dirs
    assert len(list((tmp_path / "shared").rglob("*.tar"))) == 10
