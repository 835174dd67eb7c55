"""The one atomic writer (swinv2.files.AtomicPath): a file or a folder appears whole under its name or not
at all, and a failed write leaves neither a half-written target nor its temporary behind."""

import os

import pytest
import torch

from swinv2.files import AtomicPath, default_file_mode, save_safetensors, write_text_atomic


def test_a_file_replaces_the_old_one_only_when_the_write_succeeds(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    write_text_atomic(path, "first")
    with pytest.raises(RuntimeError), AtomicPath(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the disk filled up")
    assert path.read_text() == "first" and sorted(os.listdir(path.parent)) == ["out.txt"]
    with AtomicPath(path) as tmp:
        assert tmp.parent == path.parent and tmp != path  # same folder: the rename is atomic
        tmp.write_text("second")
    assert path.read_text() == "second" and sorted(os.listdir(path.parent)) == ["out.txt"]


def test_a_folder_is_published_whole_or_removed(tmp_path):
    target = tmp_path / "set"
    with pytest.raises(OSError), AtomicPath(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
        raise OSError("killed")
    assert list(tmp_path.iterdir()) == []
    with AtomicPath(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    assert [p.name for p in target.iterdir()] == ["a"] and [p.name for p in tmp_path.iterdir()] == ["set"]


def test_explicit_temporary_name_commit_and_discard(tmp_path):
    final = tmp_path / "s-000.tar"
    target = AtomicPath(final, temp=str(final) + ".partial")
    target.temp.write_bytes(b"x")
    assert not final.exists() and target.temp.name == "s-000.tar.partial"
    assert target.commit() == final and final.read_bytes() == b"x" and not target.temp.exists()
    other = AtomicPath(tmp_path / "t.tar", temp=tmp_path / "t.tar.partial")
    other.temp.write_bytes(b"y")
    other.discard()
    other.discard()  # nothing left: still fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000.tar"]


def test_safetensors_get_the_umask_mode(tmp_path):
    path = save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert path.stat().st_mode & 0o777 == default_file_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
