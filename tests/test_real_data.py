"""benchmarks/real_data.py, the real-image benchmark's data: stratified, disjoint, nested splits, and PNG folders
that go through launch/make_shards.py's writer to the loader with their labels (the shipped sets themselves need
``pip install -e '.[bench]'``; these tests draw their own images)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

from swinv2.data import build_loader

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("real_data", ROOT / "benchmarks" / "real_data.py")
real_data = importlib.util.module_from_spec(spec)
sys.modules["real_data"] = real_data
spec.loader.exec_module(real_data)


def test_splits_are_stratified_disjoint_and_nested():
    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(1).permutation(500)]
    out = real_data.splits(labels, 0.2, [20, 100])
    assert set(out) == {"test", "train", "labelled_20", "labelled_100"}
    assert not set(out["test"]) & set(out["train"]) and len(out["test"]) + len(out["train"]) == 500
    for name, per_class in (("test", 10), ("train", 40), ("labelled_20", 2), ("labelled_100", 10)):
        assert np.bincount(labels[out[name]], minlength=10).tolist() == [per_class] * 10, name
    assert set(out["labelled_20"]) <= set(out["labelled_100"]) <= set(out["train"])
    assert all(np.array_equal(out[k], real_data.splits(labels, 0.2, [20, 100])[k]) for k in out)  # fixed seed


def test_a_written_split_reaches_the_loader_with_its_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = np.arange(12) % 10
    index = np.array([0, 3, 5, 7, 10, 11])
    real_data.write_split(images, labels, index, tmp_path / "images" / "few", tmp_path / "shards" / "few")
    meta = json.loads((tmp_path / "shards" / "few" / "dataset.json").read_text())
    classes = sorted({str(labels[i]) for i in index})  # the class folders present, in sorted order
    assert meta["samples"] == 6 and meta["classes"] == classes
    cfg = dict(eval_urls=str(tmp_path / "shards" / "few"), batch_size=6, num_workers=0, crop_pct=1.0,
               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="nearest")
    batch = next(iter(build_loader(cfg, "eval", rank=0, world_size=1, img_size=28)))
    got = {int(k): (int(c), x) for k, c, x in zip(batch["key"], batch["label"], batch["image"], strict=True)}
    by_pixels = {i: classes.index(str(labels[i])) for i in index}
    for _, (label, x) in got.items():  # every image comes back with its own label, pixels intact (grey -> RGB)
        match = [i for i in index if torch.equal((x[0] * 255).round().to(torch.uint8), torch.from_numpy(images[i]))]
        assert len(match) == 1 and by_pixels[match[0]] == label
