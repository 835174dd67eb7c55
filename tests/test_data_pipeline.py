"""The webdataset streams on real tar shards with real worker processes: eval exactness across simulated ranks
and workers, exact resampled epochs, corrupt samples skipped and counted, pipe: URLs, JPEG draft decoding."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from data_helpers import COLOURS, image_bytes, labelled_shards, make_class_folder, write_tar
from PIL import Image

from swinv2.data import DataConfig, build_loader, decode_image, write_shards


def _cfg(**overrides) -> DataConfig:
    base = dict(batch_size=4, num_workers=2, shuffle_buffer=16, auto_augment=None, re_prob=0.0)
    return DataConfig(**{**base, **overrides})


def _keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


@pytest.mark.parametrize("sizes", [[7, 3, 10, 1, 4], [9, 2, 5]], ids=["5-uneven-shards", "3-shards-for-4-workers"])
def test_eval_stream_is_disjoint_and_complete_across_ranks_and_workers(tmp_path, sizes):
    urls, labels = labelled_shards(tmp_path, sizes)
    seen: list[str] = []
    for rank in range(2):
        loader = build_loader(_cfg(), "eval", rank=rank, world_size=2, urls=urls, img_size=32)
        keys, batch_labels = [], []
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 32, 32)
            keys += batch["key"]
            batch_labels += batch["label"].tolist()
        assert loader.num_samples == len(keys)  # the reported count is what this rank really got
        assert batch_labels == [labels[k] for k in keys]
        seen += keys
    assert len(seen) == len(set(seen)) == sum(sizes)  # nothing twice ...
    assert set(seen) == set(labels)  # ... nothing missing


def test_eval_with_more_consumers_than_shards_gives_some_nothing(tmp_path):
    urls, labels = labelled_shards(tmp_path, [6])
    counts = []
    for rank in range(2):
        loader = build_loader(_cfg(), "eval", rank=rank, world_size=2, urls=urls, img_size=32)
        counts.append(len(_keys(loader)))
        assert loader.num_samples == counts[-1]
    assert counts == [6, 0]


def test_training_epoch_is_exact_per_rank_and_streams_differ(tmp_path):
    urls, _ = labelled_shards(tmp_path, [5, 3])  # far fewer samples than an epoch: resampling must fill it
    cfg = _cfg(samples_per_epoch=30, batch_size=4)  # 30 // 4 = 7 steps (4 + 3 over two workers)
    streams = {}
    for rank in range(2):
        loader = build_loader(cfg, "train", rank=rank, world_size=2, urls=urls, img_size=32)
        assert len(loader) == 7
        for epoch in range(2):
            batches = list(loader)
            assert len(batches) == 7 and all(len(b["key"]) == 4 for b in batches)
            assert loader.num_samples == 28 and loader.epoch == epoch
            streams[rank, epoch] = [k for b in batches for k in b["key"]]
    assert streams[0, 0] != streams[1, 0]  # ranks differ
    assert streams[0, 0] != streams[0, 1]  # epochs differ
    again = build_loader(cfg, "train", rank=1, world_size=2, urls=urls, img_size=32)
    again.set_epoch(1)
    assert _keys(again) == streams[1, 1]  # and each (seed, rank, worker, epoch) stream is reproducible


def test_epoch_length_from_dataset_json(tmp_path):
    make_class_folder(tmp_path / "src", per_class=5)  # 15 images
    write_shards(tmp_path / "src", str(tmp_path / "out" / "t-%06d.tar"), max_samples=4, progress=False)
    loader = build_loader(_cfg(batch_size=2, num_workers=1), "train", rank=0, world_size=2,
                          urls=str(tmp_path / "out"), img_size=32)
    assert len(loader) == (15 // 2) // 2 == len(list(loader))


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    good = image_bytes(COLOURS["red"], (40, 30))
    truncated = good[: len(good) // 2]
    samples = [(f"{i:03d}", {"jpg": good, "cls": b"2"}) for i in range(10)]
    samples[3] = ("003", {"jpg": truncated, "cls": b"2"})
    samples[9] = ("009", {"jpg": b"certainly not a jpeg", "cls": b"2"})  # after the last full batch of 4
    shard = str(write_tar(tmp_path / "bad.tar", samples))
    with caplog.at_level(logging.WARNING, logger="swinv2.data"):
        loader = build_loader(_cfg(num_workers=2), "eval", rank=0, world_size=1, urls=shard, img_size=32)
        keys = _keys(loader)
    assert sorted(keys) == [f"{i:03d}" for i in range(10) if i not in (3, 9)]
    assert loader.num_samples == 8 and loader.epoch_skipped == loader.skipped == 2
    assert any(":003:" in e for e in loader.errors) and any(":009:" in e for e in loader.errors)
    assert "skipped 2 unusable samples" in caplog.text


def test_corrupt_samples_do_not_change_training_epoch_length(tmp_path):
    samples = [(f"{i:03d}", {"jpg": image_bytes(COLOURS["red"], (40, 30)), "cls": b"2"}) for i in range(6)]
    samples[2] = ("002", {"jpg": b"\xff\xd8\xff garbage", "cls": b"2"})
    shard = str(write_tar(tmp_path / "bad.tar", samples))
    loader = build_loader(_cfg(samples_per_epoch=40, batch_size=4, num_workers=2), "train", urls=shard,
                          rank=0, world_size=1, img_size=32)
    batches = list(loader)
    assert len(batches) == 10 and all(len(b["key"]) == 4 for b in batches)
    assert "002" not in {k for b in batches for k in b["key"]}
    assert loader.skipped > 0  # the bad sample came round at least once and was counted each time


def test_a_stream_of_only_bad_samples_or_empty_shards_stops_with_a_clear_error(tmp_path):
    shard = str(write_tar(tmp_path / "bad.tar", [(f"{i}", {"jpg": b"junk", "cls": b"0"}) for i in range(4)]))
    loader = build_loader(_cfg(samples_per_epoch=8, num_workers=0, max_consecutive_errors=5), "train",
                          urls=shard, rank=0, world_size=1, img_size=32)
    with pytest.raises(RuntimeError, match="5 samples in a row could not be read"):
        list(loader)
    empty = str(write_tar(tmp_path / "empty.tar", []))
    loader = build_loader(_cfg(samples_per_epoch=8, num_workers=0), "train", urls=empty, rank=0, world_size=1,
                          img_size=32)
    with pytest.raises(RuntimeError, match="1000 shards in a row held no sample"):
        list(loader)


def test_pipe_cat_url(tmp_path):
    urls, labels = labelled_shards(tmp_path, [5, 4])
    loader = build_loader(_cfg(num_workers=1), "eval", urls=[f"pipe:cat {u}" for u in urls], rank=0, world_size=1,
                          img_size=32)
    assert sorted(_keys(loader)) == sorted(labels)
    brace = f"pipe:cat {tmp_path}/s-{{0000..0001}}.tar"  # braces expand inside pipe: commands too
    brace_loader = build_loader(_cfg(num_workers=0), "eval", urls=brace, rank=0, world_size=1, img_size=32)
    assert sorted(_keys(brace_loader)) == sorted(labels)


def test_pretrain_stream_batches_images_and_masks(tmp_path):
    urls, _ = labelled_shards(tmp_path, [6])

    def simmim_like(img: Image.Image):
        image = torch.from_numpy(__import__("numpy").asarray(img.resize((32, 32)))).permute(2, 0, 1).float()
        return image, torch.ones(8, 8, dtype=torch.int64)

    loader = build_loader(_cfg(samples_per_epoch=8, num_workers=1), "pretrain", transform=simmim_like, urls=urls,
                          rank=0, world_size=1, img_size=32)
    batches = list(loader)
    assert len(batches) == 2 and set(batches[0]) == {"image", "mask", "key"}
    assert batches[0]["image"].shape == (4, 3, 32, 32) and batches[0]["mask"].shape == (4, 8, 8)


def test_fine_tune_labels_match_images(tmp_path):
    urls, labels = labelled_shards(tmp_path, [9])
    loader = build_loader(_cfg(num_workers=0, color_jitter=0.0, scale=(0.5, 1.0), samples_per_epoch=12), "train",
                          urls=urls, rank=0, world_size=1, img_size=32)
    for batch in loader:
        dominant = batch["image"].mean(dim=(2, 3)).argmax(dim=1)  # blue, green, red -> channel 2, 1, 0
        assert (dominant == 2 - batch["label"]).all()
        assert batch["label"].tolist() == [labels[k] for k in batch["key"]]


def test_jpeg_draft_decodes_at_reduced_scale():
    big = image_bytes((120, 60, 30), (1024, 768))
    assert decode_image(big).size == (1024, 768)
    assert decode_image(big, min_side=288).size == (512, 384)  # 1/2 scale keeps both sides >= 288
    assert decode_image(big, min_side=90).size == (128, 96)  # 1/8 is the smallest libjpeg scale
    png = image_bytes((120, 60, 30), (1024, 768), "PNG")
    assert decode_image(png, min_side=90).size == (1024, 768)  # draft is JPEG only
    grey = io.BytesIO()
    Image.new("L", (50, 40), 7).save(grey, "PNG")
    assert decode_image(grey.getvalue()).mode == "RGB"



@pytest.mark.parametrize("indexed", [True, False], ids=["with-dataset.json", "without-dataset.json"])
def test_a_truncated_shard_is_one_error_counting_the_samples_it_lost(tmp_path, indexed, caplog):
    # Shards from the real writer (8 + 7 samples, sizes in dataset.json); the first one cut in the middle of a
    # member, as an interrupted copy leaves it.
    make_class_folder(tmp_path / "src")  # 3 classes x 5 images
    out = tmp_path / "out"
    write_shards(tmp_path / "src", str(out / "t-%06d.tar"), max_samples=8, progress=False)
    first = out / "t-000000.tar"
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2 + 100])
    if not indexed:
        (out / "dataset.json").unlink()
    loader = build_loader(_cfg(num_workers=1), "eval", urls=str(out), rank=0, world_size=1, img_size=32)
    with caplog.at_level(logging.WARNING, logger="swinv2.data"):
        keys = _keys(loader)
    assert len(keys) == len(set(keys)) == loader.num_samples
    delivered = loader.num_samples - 7  # the second shard is whole
    assert 0 < delivered < 8, keys
    assert len(loader.errors) == 1  # the cut is reported once, whatever webdataset stage saw it
    message = loader.errors[0]
    assert str(first) in message and f"unreadable after {delivered} samples" in message
    if indexed:
        # Exact: every one of the 15 samples is either delivered or counted as lost.
        assert f"{8 - delivered} of its 8 lost" in message
        assert loader.skipped == 8 - delivered and loader.num_samples + loader.skipped == 15
    else:
        assert "no dataset.json" in message and loader.skipped == 1
    assert any(str(first) in r.getMessage() for r in caplog.records)
