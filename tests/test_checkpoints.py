"""Checkpoint layouts, adaptation to new windows/resolutions/classes, reports, export and clear errors."""

import argparse
import json
import os
import pickle
import subprocess
import sys

import pytest
import timm
import torch
from conftest import TINY_V1, TINY_V2, randomize_

import swinv2
from swinv2.layouts import save_checkpoint


def _v2(**kw):
    return swinv2.create_model("swinv2_tiny_window8_256", **{**dict(img_size=64, **TINY_V2), **kw}).eval()


def _v1(**kw):
    return swinv2.create_model("swin_tiny_patch4_window7_224", **{**dict(img_size=56, **TINY_V1), **kw}).eval()


def _same_outputs(a, b, size=64):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_authors_layout_with_derived_buffers_loads_exactly():
    source = randomize_(_v2())
    authors = {k: v.clone() for k, v in source.state_dict().items()}
    authors["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 64, 64)  # the authors' files carry derived buffers
    authors["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(64, 64, dtype=torch.long)
    authors["layers.0.blocks.0.attn.relative_coords_table"] = torch.zeros(1, 15, 15, 2)
    target = _v2()
    report = swinv2.load_checkpoint(target, {"model": authors, "epoch": 300})
    assert report.layout == "ours/authors'" and not report.missing and not report.unexpected
    assert len(report.dropped) == 3 and len(report.loaded) == len(source.state_dict())
    _same_outputs(source, target)
    assert "loaded" in str(report) and "dropped (3)" in str(report)


def test_timm_layout_is_detected_and_renamed():
    source = randomize_(_v2())
    timm_state = swinv2.export_timm_state_dict(source)
    assert "head.fc.weight" in timm_state and "layers.1.downsample.reduction.weight" in timm_state
    assert not any(k.startswith("layers.0.downsample") for k in timm_state)
    target = _v2()
    assert swinv2.load_checkpoint(target, timm_state).layout == "timm"
    _same_outputs(source, target)


def test_simmim_encoder_loads_into_classifier():
    encoder = randomize_(_v2(num_classes=0))
    simmim = {"encoder." + k: v for k, v in encoder.state_dict().items()}
    simmim["encoder.mask_token"] = torch.zeros(1, 1, 32)
    simmim["decoder.0.weight"] = torch.zeros(3 * 32 * 32, 256, 1, 1)
    simmim["decoder.0.bias"] = torch.zeros(3 * 32 * 32)
    classifier = _v2(num_classes=10)
    report = swinv2.load_checkpoint(classifier, {"model": simmim})
    assert report.layout == "SimMIM (encoder)"
    assert set(report.dropped) == {"encoder.mask_token", "decoder.0.weight", "decoder.0.bias"}
    assert report.missing == ["head.weight", "head.bias"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(classifier.forward_features(x), encoder.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_round_trip(tmp_path, suffix):
    source = randomize_(_v2())
    path = save_checkpoint(source, tmp_path / f"weights{suffix}")
    assert not list(tmp_path.glob("*.tmp"))
    target = _v2()
    swinv2.load_checkpoint(target, path)
    _same_outputs(source, target)
    via_create = swinv2.create_model("swinv2_tiny_window8_256", checkpoint=path, img_size=64, **TINY_V2).eval()
    _same_outputs(source, via_create)


def test_timm_file_export_loads_into_timm(tmp_path):
    source = randomize_(_v2())
    path = save_checkpoint(source, tmp_path / "timm.safetensors", layout="timm")
    ref = timm.create_model("swinv2_tiny_window8_256", img_size=64, **TINY_V2, checkpoint_path=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), source(x), rtol=1e-5, atol=1e-5)


def test_v2_window_change_keeps_cpb_values_for_shared_offsets():
    # pretrained at window 4 (64 px -> 16x16 tokens), fine-tuned at window 8 on 128 px with pretrained window 4
    source = randomize_(_v2(window_size=4))
    target = swinv2.create_model(
        "swinv2_tiny_window8_256", img_size=128, window_size=8, pretrained_window_sizes=4, **TINY_V2
    ).eval()
    report = swinv2.load_checkpoint(target, source.state_dict())
    assert not report.missing and not report.unexpected
    assert any("pretrained windows [(4, 4)" in line for line in report.adapted)
    old = source.layers[0].blocks[0].attn.position_bias()  # (nH, 16, 16) for a 4x4 window
    new = target.layers[0].blocks[0].attn.position_bias()  # (nH, 64, 64) for an 8x8 window
    # token (y, x) of the 4x4 window is token (y, x) of the top-left of the 8x8 window: same offsets, same bias
    idx = torch.tensor([y * 8 + x for y in range(4) for x in range(4)])
    torch.testing.assert_close(new[:, idx][:, :, idx], old, rtol=1e-6, atol=1e-6)


def test_v1_bias_table_and_position_embedding_resized():
    source = randomize_(_v1(ape=True))
    with torch.no_grad():  # a constant per head survives bicubic resizing exactly: a hand-derived check
        for stage in source.layers:
            for block in stage.blocks:
                table = block.attn.relative_position_bias_table
                table.copy_(torch.arange(table.shape[1], dtype=torch.float32).expand_as(table))
        source.absolute_pos_embed.fill_(0.25)
    target = swinv2.create_model("swin_tiny_patch4_window7_224", img_size=112, window_size=14, ape=True, **TINY_V1)
    report = swinv2.load_checkpoint(target, source.state_dict())
    resized = [line for line in report.adapted if "bias table" in line]
    assert len(resized) == 8  # every stage's window grows: 7 -> 14, 7 -> 14, 4 -> 7 and 2 -> 4 (clipped to the map)
    table = target.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (27 * 27, 2)
    torch.testing.assert_close(table, torch.arange(2.0).expand(27 * 27, 2), rtol=0, atol=1e-5)
    assert target.absolute_pos_embed.shape == (1, 28 * 28, 32)
    torch.testing.assert_close(target.absolute_pos_embed, torch.full((1, 784, 32), 0.25), rtol=0, atol=1e-5)


def test_head_with_other_class_count_is_reinitialised():
    source = randomize_(_v2(num_classes=1000))
    target = _v2(num_classes=10)
    report = swinv2.load_checkpoint(target, source.state_dict())
    assert report.reinitialized == ["head: the checkpoint has 1000 classes, the model 10; head re-initialised"]
    assert not report.missing and target.head.bias.abs().sum() == 0
    torch.testing.assert_close(target.layers[0].blocks[0].attn.q_bias, source.layers[0].blocks[0].attn.q_bias)


def test_mismatched_checkpoints_get_one_clear_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"expects .* another architecture"):
        swinv2.load_checkpoint(_v2(), _v2(embed_dim=48, num_heads=(3, 6, 12, 24)).state_dict())
    with pytest.raises(ValueError, match=r"Swin V1 model but the model is Swin V2"):
        swinv2.load_checkpoint(_v2(), _v1().state_dict())
    with pytest.raises(ValueError, match=r"none of the checkpoint's 1 tensors"):
        swinv2.load_checkpoint(_v2(), {"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(FileNotFoundError, match=r"does not exist: check the path"):
        swinv2.load_checkpoint(_v2(), tmp_path / "missing.pth")


class _NotWeights:
    pass


def test_untrusted_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _NotWeights()}, f)
    saved = tmp_path / "saved.pth"  # torch.save's zip file: every name it imports is listed
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1), "extra": _NotWeights()}, saved)
    named = "a pickled argparse.Namespace, test_checkpoints._NotWeights"
    for file, held in [(path, "pickled objects"), (saved, named)]:
        with pytest.raises(ValueError) as refused:
            swinv2.load_checkpoint(_v2(), file)
        message = str(refused.value)
        assert message.startswith(f"checkpoint {str(file)!r} holds {held} besides weights and plain data, so it was "
                                  "not loaded"), message
        assert "safetensors.torch.save_file" in message and "\n" not in message
        assert "weights_only=False" not in message and "Re-running" not in message  # never torch's advice to run it


class _Payload:
    """Unpickling this makes the folder ``marker``: the proof that a file's code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _crafted_checkpoint(run_dir, marker):
    """A complete-looking ZeRO checkpoint folder whose model and optimizer states carry a payload."""
    folder = run_dir / "checkpoints" / "step00000005"
    folder.mkdir(parents=True)
    (folder / "complete.json").write_text(json.dumps({"step": 5, "world_size": 1}))
    torch.save({"module": {"encoder.w": _Payload(str(marker))}}, folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": _Payload(str(marker))}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return folder


def test_the_universal_conversion_refuses_a_checkpoint_that_would_run_code_by_its_name(tmp_path, monkeypatch,
                                                                                      capsys):
    from swinv2.commands.convert import main

    marker = tmp_path / "payload-ran"
    folder = _crafted_checkpoint(tmp_path / "run", marker)
    monkeypatch.chdir(tmp_path)  # the message once named the current directory instead
    assert main([str(tmp_path / "run"), "--universal"]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint {str(folder)!r} holds a pickled posix.mkdir besides "
                                       "weights and plain data, so it was not loaded, since unpickling it could run "
                                       "code: use checkpoints written by this project or weights saved as "
                                       ".safetensors\n")
    assert not marker.exists() and sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


@pytest.mark.slow  # DeepSpeed's converter in a subprocess, as a resume at another world size runs it
def test_the_converter_subprocess_names_the_checkpoint_it_refuses(tmp_path):
    marker = tmp_path / "payload-ran"
    folder = _crafted_checkpoint(tmp_path / "run", marker)
    runner = ("from swinv2.train.safe_load import run_module_weights_only as run; "
              "run('deepspeed.checkpoint.ds_to_universal')")
    result = subprocess.run([sys.executable, "-c", runner, "--input_folder", str(folder), "--output_folder",
                             str(tmp_path / "out"), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: checkpoint {str(folder)!r} holds a pickled posix.mkdir besides weights and plain "
                      "data, so it was not loaded, since unpickling it could run code: use checkpoints written by "
                      "this project or weights saved as .safetensors"]
    assert "Traceback" not in result.stderr and not marker.exists()
