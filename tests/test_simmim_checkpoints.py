"""SimMIM checkpoints: ours and the authors' layout load exactly; the exported encoder fine-tunes at a larger size."""

import pytest
import torch
from conftest import randomize_
from simmim_helpers import TINY, V1, V2, masks, one_thread, tiny_simmim  # noqa: F401 (fixture

import simmim
import swinv2

pytestmark = pytest.mark.usefixtures("one_thread")


def authors_layout(model):
    """The authors' SimMIM file, made by renaming our weights: mask token on the encoder, weights under "model",
    plus the derived buffers their files carry."""
    state = {("encoder.mask_token" if k == "mask_token" else k): v.clone() for k, v in model.state_dict().items()}
    state["encoder.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    state["encoder.layers.0.blocks.0.attn_mask"] = torch.zeros(1, 16, 16)
    return {"model": state, "epoch": 99, "config": "..."}


def same_loss(a, b, size=(64, 64)):
    images, mask = torch.randn(2, 3, *size), masks(size, 2)
    with torch.no_grad():
        torch.testing.assert_close(a(images, mask), b(images, mask), rtol=0, atol=0)


@pytest.mark.parametrize("name", [V2, V1])
def test_authors_layout_loads_and_gives_the_same_loss(name):
    source = tiny_simmim(name, norm_target=47)
    checkpoint = authors_layout(source)
    assert checkpoint["model"]["encoder.mask_token"].shape == (1, 1, 16)
    assert {"decoder.0.weight", "decoder.0.bias"} <= set(checkpoint["model"])
    target = simmim.SimMIM(swinv2.create_model(name, **TINY), norm_target_patch_size=47).eval()
    report = simmim.load_checkpoint(target, checkpoint)
    assert report.layout == "SimMIM (authors')"
    assert not report.missing and not report.unexpected
    assert sorted(report.loaded) == sorted(target.state_dict())
    assert len(report.dropped) == 2 and all(k.startswith("encoder.layers.0.") for k in report.dropped)
    same_loss(source, target)


def test_our_layout_round_trips_through_a_file(tmp_path):
    source = tiny_simmim()
    torch.save(source.state_dict(), tmp_path / "simmim.pth")
    target = simmim.SimMIM(swinv2.create_model(V2, **TINY)).eval()
    report = simmim.load_checkpoint(target, tmp_path / "simmim.pth")
    assert report.layout == "SimMIM (ours)" and not report.missing and not report.unexpected
    same_loss(source, target, size=(64, 96))
    # the plain swinv2 loader also takes our SimMIM file, for the encoder alone
    classifier = swinv2.create_model(V2, **{**TINY, "num_classes": 5})
    assert swinv2.load_checkpoint(classifier, tmp_path / "simmim.pth").missing == ["head.weight", "head.bias"]


def test_a_plain_backbone_initialises_the_encoder():
    classifier = randomize_(swinv2.create_model(V2, **{**TINY, "num_classes": 7}))
    model = simmim.SimMIM(swinv2.create_model(V2, **TINY))
    report = simmim.load_checkpoint(model, {"model": classifier.state_dict()})
    assert report.layout == "backbone only"
    assert sorted(report.missing) == ["decoder.0.bias", "decoder.0.weight", "mask_token"]
    assert sorted(report.dropped) == ["head.bias", "head.weight"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.forward_features(x), classifier.forward_features(x), rtol=0, atol=0)


def test_another_architecture_is_a_clear_error():
    checkpoint = tiny_simmim().state_dict()
    wider = simmim.SimMIM(swinv2.create_model(V2, **{**TINY, "embed_dim": 32}))
    with pytest.raises(ValueError, match="another architecture"):
        simmim.load_checkpoint(wider, checkpoint)


def test_exported_v2_encoder_loads_into_a_classifier_at_a_larger_resolution_and_window():
    source = tiny_simmim(V2)
    exported = simmim.export_encoder(source)
    assert not any(k.startswith(("decoder", "mask_token", "encoder.")) for k in exported)
    assert set(exported) == set(source.encoder.state_dict())
    # pretrained at 64 px / window 4 (stage windows 4, 4, 4, 2) -> fine-tune at 128 px / window 8
    config = {**TINY, "img_size": 128, "window_size": 8, "pretrained_window_sizes": (4, 4, 4, 2), "num_classes": 10}
    classifier = swinv2.create_model(V2, **config)
    report = swinv2.load_checkpoint(classifier, exported)
    assert report.missing == ["head.weight", "head.bias"] and not report.unexpected and not report.dropped
    assert any(line.startswith("V2 position bias") for line in report.adapted)
    cpb = [k for k in exported if ".cpb_mlp." in k]
    assert len(cpb) == 3 * 4  # two Linear weights + one bias per block, 4 blocks
    for key in cpb:
        assert torch.equal(classifier.state_dict()[key], exported[key]), key
    with torch.no_grad():
        logits = classifier(torch.randn(2, 3, 128, 128))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_exported_v1_encoder_resizes_its_bias_tables():
    source = tiny_simmim(V1)
    classifier = swinv2.create_model(V1, **{**TINY, "img_size": 128, "window_size": 8, "num_classes": 10})
    report = swinv2.load_checkpoint(classifier, simmim.export_encoder(source))
    resized = [line for line in report.adapted if "bias table" in line]
    assert len(resized) == 4 and "(49, 1) -> (225, 1)" in resized[0]  # window 4 -> 8: (2*4-1)^2 -> (2*8-1)^2
    with torch.no_grad():
        assert classifier(torch.randn(1, 3, 128, 128)).shape == (1, 10)
