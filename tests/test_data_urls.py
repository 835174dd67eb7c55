"""Shard URL expansion and the data options: what users write, and one clear sentence when it is wrong."""

from __future__ import annotations

import json
import re

import pytest
from omegaconf import OmegaConf

from swinv2.data import DataConfig, build_loader, count_samples, expand_urls


@pytest.fixture
def shard_dir(tmp_path):
    for i in range(3):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "train-000003.tar.partial").write_bytes(b"")  # an unfinished shard is never listed
    (tmp_path / "dataset.json").write_text(json.dumps({"shards": [
        {"name": f"train-{i:06d}.tar", "samples": 10 + i} for i in range(3)]}))
    return tmp_path


def test_local_braces_folders_and_globs(shard_dir):
    expected = [str(shard_dir / f"train-{i:06d}.tar") for i in range(3)]
    assert expand_urls(f"{shard_dir}/train-{{000000..000002}}.tar") == expected
    assert expand_urls(str(shard_dir)) == expected
    assert expand_urls(f"{shard_dir}/train-*.tar") == expected
    assert expand_urls(f"{shard_dir}/train-000000.tar::{shard_dir}/train-000002.tar") == expected[::2]
    assert expand_urls([expected[1], f"file://{expected[0]}"]) == [expected[1], expected[0]]
    assert count_samples(expected) == 33 and count_samples(expected[:1] + ["http://x/y.tar"]) is None


def test_remote_urls_become_what_webdataset_can_open():
    assert expand_urls("s3://bucket/data/train-{0..1}.tar") == [
        "pipe:aws s3 cp s3://bucket/data/train-0.tar -", "pipe:aws s3 cp s3://bucket/data/train-1.tar -"]
    assert expand_urls("gs://b/t-{00..01}.tar") == ["pipe:gsutil cat gs://b/t-00.tar", "pipe:gsutil cat gs://b/t-01.tar"]
    assert expand_urls("https://host/t-{0..2}.tar")[2] == "https://host/t-2.tar"
    assert expand_urls("pipe:curl -s http://host/t-{0..1}.tar") == ["pipe:curl -s http://host/t-0.tar",
                                                                    "pipe:curl -s http://host/t-1.tar"]
    with pytest.raises(ValueError, match="scheme 'ftpx'"):
        expand_urls("ftpx://host/t.tar")


def test_missing_shards_name_the_pattern_and_the_fix(shard_dir):
    pattern = f"{shard_dir}/train-{{000000..000004}}.tar"
    with pytest.raises(FileNotFoundError) as info:
        expand_urls(pattern)
    message = str(info.value)
    assert "2 shards" in message and "train-000003.tar" in message and pattern in message
    assert "make_shards.py" in message and message.count(". ") == 0  # one sentence
    with pytest.raises(FileNotFoundError, match="holds no .tar shards"):
        (shard_dir / "empty").mkdir()
        expand_urls(str(shard_dir / "empty"))
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_urls(f"{shard_dir}/val-*.tar")
    with pytest.raises(ValueError, match="no shard URLs"):
        expand_urls(" :: ")


def test_bad_options_get_one_sentence_each():
    with pytest.raises(ValueError) as info:
        DataConfig(batch_size=0, crop_pct=1.5, scale=(0.9, 0.1))
    message = str(info.value)
    sentences = re.split(r"(?<=\.) (?=data\.)", message)
    assert len(sentences) == 3
    assert [s.split(" ")[0] for s in sentences] == ["data.batch_size", "data.crop_pct", "data.scale"]
    with pytest.raises(ValueError, match="data.interpolation must be one of"):
        DataConfig(interpolation="cubic")
    with pytest.raises(ValueError, match="data.colour_jitter is not a data option"):
        DataConfig.coerce({"colour_jitter": 0.3})


def test_embeds_in_an_omegaconf_structured_config(shard_dir):
    from dataclasses import dataclass, field

    @dataclass
    class Train:
        data: DataConfig = field(default_factory=DataConfig)

    cfg = OmegaConf.merge(OmegaConf.structured(Train), OmegaConf.from_dotlist(
        [f"data.eval_urls={shard_dir}", "data.batch_size=8", "data.scale=[0.5,1.0]"]))
    assert cfg.data.batch_size == 8 and OmegaConf.to_object(cfg).data.scale == (0.5, 1.0)
    assert DataConfig.coerce(cfg.data).eval_urls == str(shard_dir)
    with pytest.raises(Exception, match="batch_sise"):
        OmegaConf.merge(OmegaConf.structured(Train), OmegaConf.from_dotlist(["data.batch_sise=8"]))
    with pytest.raises(ValueError, match="data.batch_size must be a positive integer"):
        OmegaConf.to_object(OmegaConf.merge(cfg, OmegaConf.from_dotlist(["data.batch_size=-1"])))


def test_build_loader_refuses_what_cannot_work(shard_dir):
    cfg = DataConfig(train_urls=str(shard_dir), batch_size=8)
    with pytest.raises(ValueError, match="data.eval_urls is empty"):
        build_loader(cfg, "eval", rank=0, world_size=1, img_size=192)
    with pytest.raises(ValueError, match="needs transform=simmim.PretrainTransform"):
        build_loader(cfg, "pretrain", rank=0, world_size=1, img_size=192)
    with pytest.raises(ValueError, match="kind must be one of"):
        build_loader(cfg, "finetune", rank=0, world_size=1, img_size=192)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        build_loader(cfg, "train", rank=2, world_size=2, img_size=192)
    with pytest.raises(ValueError, match="less than one batch"):  # dataset.json: 33 samples / 8 ranks = 4 < 8
        build_loader(cfg, "train", rank=0, world_size=8, img_size=192)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_loader(DataConfig(train_urls=f"{shard_dir}/nope-{{0..3}}.tar", samples_per_epoch=64), "train",
                     rank=0, world_size=1, img_size=192)


def test_rank_comes_from_the_environment(shard_dir, monkeypatch):
    from swinv2.data import resolve_rank

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (3, 4) and resolve_rank(rank=1) == (1, 4)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert resolve_rank() == (0, 1)


def test_unreadable_remote_shards_are_one_sentence_at_start_up(tmp_path):
    """A failing ``pipe:`` command or an unreachable host ends in one sentence naming the setting when the loader is
    built (evaluation, training or a probe's shards), not in a traceback from a loader worker; a command that gives
    bytes passes."""
    import socket

    from swinv2.data import DataError

    with socket.socket() as s:  # a port nothing listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = [("pipe:false", "exit status 1 and no data"),
             (f"http://127.0.0.1:{port}/val-000000.tar", "and no data")]
    for url, why in cases:
        cfg = DataConfig(eval_urls=url, batch_size=2, num_workers=0)
        with pytest.raises(DataError, match=rf"^data\.eval_urls: could not read {re.escape(url)} \(.*{why}\);"):
            build_loader(cfg, "eval", rank=0, world_size=1, img_size=32)
    with pytest.raises(DataError, match=r"^data\.train_urls: could not read pipe:false "):
        build_loader(DataConfig(train_urls="pipe:false", samples_per_epoch=4, batch_size=2), "train", rank=0,
                     world_size=1, img_size=32)
    with pytest.raises(DataError, match=r"^probe\.train_urls: could not read pipe:false "):
        build_loader(DataConfig(batch_size=2), "eval", rank=0, world_size=1, urls="pipe:false", img_size=32,
                     setting="probe.train_urls")
    shard = tmp_path / "val.tar"
    shard.write_bytes(b"x" * 4096)
    build_loader(DataConfig(eval_urls=f"pipe:cat {shard}", batch_size=2, num_workers=0), "eval", rank=0,
                 world_size=1, img_size=32)
