"""The shard writer, through launch/make_shards.py as a real subprocess where the command line matters:
round trip to the loader, re-encoding, file lists, size limits, interrupted writes, bad options."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_helpers import COLOURS, image_bytes, make_class_folder, shard_members
from PIL import Image

from swinv2.data import DataConfig, build_loader, write_shards

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "make_shards.py"


def _run(*args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit():  # runs in the child: files it writes may not grow past limit_bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, str(SCRIPT), *args, "--quiet"], capture_output=True, text=True,
                          preexec_fn=limit if limit_bytes else None, timeout=120)


def _cli():
    spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_round_trip_from_image_folder_through_make_shards_to_the_loader(tmp_path):
    files = make_class_folder(tmp_path / "src", per_class=5)
    (tmp_path / "src" / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "shards"
    result = _run(str(tmp_path / "src"), str(out / "train-%06d.tar"), "--max-samples", "4", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "wrote 15 images in 4 shards" in result.stdout and "broken.jpg" in result.stdout

    index = json.loads((out / "dataset.json").read_text())
    assert index["classes"] == sorted(COLOURS) == ["blue", "green", "red"]
    assert [s["samples"] for s in index["shards"]] == [4, 4, 4, 3] and index["samples"] == 15
    assert [s["name"] for s in index["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    assert index["skipped"][0]["path"].endswith("broken.jpg") and index["options"]["max_samples"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json"] + [s["name"] for s in index["shards"]]

    # Originals are stored byte for byte, under their own format's extension, with the folder's label.
    stored = {}
    for shard in index["shards"]:
        members = shard_members(out / shard["name"])
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext in ("jpg", "png"):
                stored[_sha(data)] = (ext, int(members[f"{key}.cls"]))
    expected = {_sha(p.read_bytes()): (p.suffix[1:], sorted(COLOURS).index(c)) for c, ps in files.items() for p in ps}
    assert stored == expected

    loader = build_loader(DataConfig(eval_urls=str(out), batch_size=4, num_workers=2), "eval",
                          rank=0, world_size=1, img_size=64)
    labels = []
    for batch in loader:
        dominant = batch["image"].mean(dim=(2, 3)).argmax(dim=1)  # blue, green, red: channels 2, 1, 0
        assert (dominant == 2 - batch["label"]).all()
        labels += batch["label"].tolist()
    assert sorted(labels) == [0] * 5 + [1] * 5 + [2] * 5 and loader.num_samples == loader.expected_samples == 15


def test_resize_reencodes_the_shorter_side_and_keeps_small_jpegs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "wide.png").write_bytes(image_bytes((10, 200, 10), (300, 150), "PNG"))
    (src / "tall.jpg").write_bytes(image_bytes((10, 200, 10), (100, 400)))
    small = image_bytes((10, 200, 10), (60, 50))
    (src / "small.jpg").write_bytes(small)
    summary = write_shards(src, str(tmp_path / "out" / "x-%04d.tar"), resize=64, quality=80, progress=False)
    assert summary.images == 3 and summary.classes is None
    members = shard_members(summary.shards[0])
    assert not any(name.endswith(".cls") for name in members)  # a flat folder has no labels
    sizes = sorted(Image.open(io.BytesIO(data)).size for data in members.values())
    assert all(name.endswith(".jpg") for name in members)
    assert sizes == [(60, 50), (64, 256), (128, 64)]
    assert small in members.values()  # already small enough: not re-encoded


def test_file_list_with_class_names_and_shuffle(tmp_path):
    files = make_class_folder(tmp_path / "imgs", per_class=3)
    lines = ["path,label"] + [f"imgs/{c}/{p.name},{c}" for c, ps in files.items() for p in ps]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    a = write_shards(tmp_path / "list.csv", str(tmp_path / "a" / "s-%03d.tar"), shuffle_seed=1, progress=False)
    b = write_shards(tmp_path / "list.csv", str(tmp_path / "b" / "s-%03d.tar"), shuffle_seed=2, progress=False)
    assert a.classes == b.classes == ["blue", "green", "red"] and a.images == 9
    ma, mb = shard_members(a.shards[0]), shard_members(b.shards[0])
    assert sorted(ma.values()) == sorted(mb.values()) and list(ma.values()) != list(mb.values())
    for members in (ma, mb):  # every image keeps its own class's label whatever the order
        for name, data in members.items():
            if not name.endswith(".cls"):
                colour = np.asarray(Image.open(io.BytesIO(data))).mean(axis=(0, 1)).argmax()
                assert 2 - colour == int(members[name.split(".")[0] + ".cls"])


def test_max_bytes_bounds_every_shard(tmp_path):
    make_class_folder(tmp_path / "src", per_class=5)
    summary = write_shards(tmp_path / "src", str(tmp_path / "out" / "s-%03d.tar"), max_bytes=50_000,
                           progress=False)
    sizes = [Path(p).stat().st_size for p in summary.shards]
    assert len(sizes) > 1 and max(sizes) <= 50_000
    assert sum(len([m for m in shard_members(p) if not m.endswith(".cls")]) for p in summary.shards) == 15


def test_interrupted_write_leaves_only_complete_shards_and_a_rerun_finishes(tmp_path):
    make_class_folder(tmp_path / "src", per_class=4)
    noise = np.random.default_rng(0).integers(0, 256, size=(400, 500, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "src" / "green" / "zbig.png")  # ~600 kB: its shard cannot be written
    out = tmp_path / "out"
    pattern = str(out / "s-%03d.tar")
    failed = _run(str(tmp_path / "src"), pattern, "--max-samples", "2", "--workers", "2", limit_bytes=200_000)
    assert failed.returncode == 1 and "writing failed" in failed.stderr and "File too large" in failed.stderr
    written = sorted(out.iterdir())
    # blue (4 images) and green's first four fill shards 0-3; the big PNG's shard 4 failed mid-write.
    # No .partial shard and no dataset.json; the journal lists what the run wrote, for the re-run to remove.
    assert [p.name for p in written] == ["dataset.json.partial"] + [f"s-{i:03d}.tar" for i in range(4)]
    written = written[1:]
    for path in written:
        assert len(shard_members(path)) == 4  # 2 samples x (image + label): complete and readable

    assert json.loads((out / "dataset.json.partial").read_text())["shards"][-1] == "s-004.tar"  # what it was writing
    (out / "s-004.tar.partial").write_bytes(b"left behind by a killed run")
    assert _cli().main([str(tmp_path / "src"), pattern, "--max-samples", "2", "--quiet"]) == 0
    index = json.loads((out / "dataset.json").read_text())
    assert index["samples"] == 13 and not list(out.glob("*.partial"))  # the journal is gone with them
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in index["shards"]]


def test_bad_options_end_in_one_sentence_and_exit_code_2(tmp_path, capsys):
    make_class_folder(tmp_path / "src", per_class=1)
    result = _run(str(tmp_path / "src"), str(tmp_path / "out" / "s-%03d.tar"), "--max-samples", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "make_shards.py: error: --max-samples must be at least 1, got 0."

    cli = _cli()
    cases = [
        ([str(tmp_path / "nope"), str(tmp_path / "o" / "s-%03d.tar")], "source '"),
        ([str(tmp_path / "src"), str(tmp_path / "o" / "shard.tar")], "exactly one integer field"),
        ([str(tmp_path / "src"), str(tmp_path / "o" / "s-%03d.zip")], "must end in .tar"),
        ([str(tmp_path / "src"), str(tmp_path / "o" / "s-%03d.tar"), "--quality", "101"], "--quality must be"),
        ([str(tmp_path / "src"), str(tmp_path / "o" / "s-%03d.tar"), "--resize", "4"], "--resize must be"),
        ([str(tmp_path / "src"), str(tmp_path / "src" / "red" / "img0.jpg" / "s-%03d.tar")], "is an existing file"),
        ([str(tmp_path / "src"), "/sys/s-%03d.tar"], "cannot write into output folder '/sys'"),  # even for root
        ([str(tmp_path / "src"), "/sys/swinv2-shards/s-%03d.tar"], "cannot write into output folder"),
    ]
    for argv, words in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and err.count("\n") == 0 and err.endswith(".")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own checks use the same exit code
        cli.main([str(tmp_path / "src"), "x-%d.tar", "--max-bytes", "lots"])
    assert exit_info.value.code == 2


def test_two_splits_cannot_share_a_folder(tmp_path):
    make_class_folder(tmp_path / "src", per_class=1)
    write_shards(tmp_path / "src", str(tmp_path / "out" / "train-%03d.tar"), progress=False)
    with pytest.raises(ValueError, match="its own folder"):
        write_shards(tmp_path / "src", str(tmp_path / "out" / "val-%03d.tar"), progress=False)
    assert (tmp_path / "out" / "train-000.tar").exists()  # nothing of the first split was touched


def test_make_shards_removes_only_files_it_wrote(tmp_path, capsys):
    make_class_folder(tmp_path / "src", per_class=2)
    cli, out = _cli(), tmp_path / "out"
    out.mkdir()
    theirs = {"train-000123.tar": b"a user's own shard", "notes.txt": b"keep", "train-x.tar": b"keep too"}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    assert cli.main([str(tmp_path / "src"), str(out / "train-%06d.tar"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'train-000123.tar'" in err and "did not write" in err and err.count("\n") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(theirs)  # nothing written, nothing removed
    year = tmp_path / "photos"
    year.mkdir()
    (year / "2023.tar").write_bytes(b"an archive")  # %d.tar matches it too
    assert cli.main([str(tmp_path / "src"), str(year / "%d.tar"), "--quiet"]) == 2
    assert "'2023.tar'" in capsys.readouterr().err and (year / "2023.tar").read_bytes() == b"an archive"

    (out / "train-000123.tar").unlink()
    assert cli.main([str(tmp_path / "src"), str(out / "train-%06d.tar"), "--max-samples", "1", "--quiet"]) == 0
    assert len(list(out.glob("train-0*.tar"))) == 6
    # A re-run into its own folder replaces the shards its index lists and leaves the rest.
    assert cli.main([str(tmp_path / "src"), str(out / "train-%06d.tar"), "--max-samples", "4", "--quiet"]) == 0
    index = json.loads((out / "dataset.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(["dataset.json", "notes.txt", "train-x.tar",
                                                            "train-000000.tar", "train-000001.tar"])
    assert [s["samples"] for s in index["shards"]] == [4, 2]


def grey_jpeg(width: int, height: int) -> bytes:
    """A valid mid-grey greyscale JPEG of any size, built without holding its pixels: PIL's header of an 8 x 8 grey
    image with the size patched, then one 6-bit code per 8 x 8 block (mid-grey is 0 after the level shift: DC
    difference 0 = '00' and end of block = '1010' in the standard Huffman tables), padded with 1 bits."""
    small = io.BytesIO()
    Image.new("L", (8, 8), 128).save(small, "JPEG", quality=90)
    data = small.getvalue()
    sof, sos = data.index(b"\xff\xc0"), data.index(b"\xff\xda")
    scan_start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    head = data[:sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[sof + 9:scan_start]
    bits = "001010" * (-(-width // 8) * -(-height // 8))
    bits += "1" * (-len(bits) % 8)
    return head + int(bits, 2).to_bytes(len(bits) // 8, "big") + b"\xff\xd9"  # no 0xff byte needs stuffing


def test_a_huge_photo_is_kept_reduced_with_resize_and_skipped_without(tmp_path):
    small = Image.open(io.BytesIO(grey_jpeg(40, 24)))
    assert small.size == (40, 24) and small.getextrema() == (128, 128)  # the builder makes real JPEGs
    src = tmp_path / "src"
    src.mkdir()
    (src / "huge.jpg").write_bytes(grey_jpeg(20000, 20000))  # 400 M pixels: over PIL's bomb limit of 179 M
    (src / "small.jpg").write_bytes(image_bytes((10, 200, 10), (60, 50)))
    summary = write_shards(src, str(tmp_path / "r" / "s-%03d.tar"), resize=256, progress=False)
    assert summary.images == 2 and not summary.skipped
    members = shard_members(summary.shards[0])
    huge = Image.open(io.BytesIO(members["000000.jpg"]))
    assert huge.size == (256, 256) and huge.mode == "RGB"
    assert np.abs(np.asarray(huge, dtype=np.int16) - 128).max() <= 2
    kept = write_shards(src, str(tmp_path / "k" / "s-%03d.tar"), progress=False)  # stored as is, never decodable
    assert kept.images == 1 and kept.skipped[0][0].endswith("huge.jpg")
    assert "20000 x 20000 pixels is more than the 178956970" in kept.skipped[0][1] and "--resize" in kept.skipped[0][1]
