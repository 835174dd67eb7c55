"""Hugging Face transformers in both directions (swinv2/hf_layout.py, swinv2/export.py, launch/convert.py --hf).

Every comparison is against transformers' own forward on the same weights: randomly initialised transformers models
saved with ``save_pretrained`` and loaded by us, and our models (through ``launch/convert.py --hf`` on a run
directory written with our own save functions) loaded by transformers with no missing or unexpected keys. Weights
are perturbed first (post-norm gains, logit scales past the clamp at 100, CPB MLPs, biases): freshly initialised V2
blocks are near identities and would hide mapping mistakes. The models are tiny, with three stages, a window of 3
that needs padding at every stage and, for classifiers, a non-square input; masked-image models take square images
(transformers' masked-image-modelling head reshapes its features to a square).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from data_helpers import make_class_folder
from PIL import Image
from safetensors.torch import load_file

import simmim
import swinv2
from swinv2.commands import convert
from swinv2.data import DataConfig, build_loader, write_shards
from swinv2.data.transforms import eval_transform
from swinv2.finetune.weights import load_pretrained, resolve_spec, write_model_json
from swinv2.layouts import save_checkpoint

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
ARCH = dict(embed_dim=16, depths=[2, 2, 2], num_heads=[2, 4, 4], window_size=3)  # window 3 pads every stage
V2_PRETRAINED = [0, 4, 2]  # stage 0 normalises by its own window, stages 1-2 by "pretrained" ones
NAMES = {"v1": "swin_tiny_patch4_window7_224", "v2": "swinv2_tiny_window8_256"}
F64_TOL, F32_TOL = 1e-12, 1e-4  # relative to the largest output
LOSS_F64_TOL = 1e-6  # our SimMIM sums its loss in float32 whatever the model's dtype (simmim/model.py masked_error)


def _hf(version: str, kind: str):
    prefix = "Swinv2" if version == "v2" else "Swin"
    suffix = {"classifier": "ForImageClassification", "backbone": "Model", "simmim": "ForMaskedImageModeling"}[kind]
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, prefix + suffix)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The scheme of ``conftest.randomize_`` applied to a transformers model (its names)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("logit_scale"):
            p.copy_(torch.log(1 + 20 * torch.rand(p.shape, generator=gen)))
            p.view(-1)[0] = math.log(150.0)  # past the clamp at log(100)
        elif ("norm" in name or "layernorm" in name) and name.endswith("weight"):
            p.copy_(1 + 0.2 * noise)
        elif name.endswith("relative_position_bias_table"):
            p.copy_(noise)
        else:
            p.copy_(0.05 * noise)
    return model


@torch.no_grad()
def idle_double_mask_(model: torch.nn.Module) -> torch.nn.Module:
    """Keep the logit scales of shifted V2 blocks at most 20 (ours or transformers' names).

    transformers' Swin V2 adds the shift mask twice (-200 where the paper and we add -100). A masked logit is then
    at most ``20 + 16 - 100`` below an unmasked one's ``-20``, a softmax weight under ``exp(-42)``: the difference is
    idle in float64. Unshifted blocks keep a head past the clamp at 100, so the clamp itself is still compared;
    :func:`test_transformers_adds_the_shift_mask_twice` measures the difference where it is not idle.
    """
    for module in model.modules():
        if isinstance(module, swinv2.model.SwinBlock) and module.version == "v2" and any(module.shift):
            module.attn.logit_scale.clamp_(max=math.log(20.0))
        elif type(module).__name__ == "Swinv2Layer" and module.shift_size > 0:
            module.attention.self.logit_scale.clamp_(max=math.log(20.0))
    return model


def hf_model(version: str, kind: str, image_size, seed: int = 0, **overrides):
    config_class, model_class = _hf(version, kind)
    options = dict(ARCH, image_size=image_size, encoder_stride=16, drop_path_rate=0.0, **overrides)
    if version == "v2":
        options.setdefault("pretrained_window_sizes", V2_PRETRAINED)
    return idle_double_mask_(perturb_(model_class(config_class(**options)), seed)).eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def agree(ours, theirs, x, *extra) -> tuple[float, float]:
    """Relative max differences of ``ours(x)`` and ``theirs(x)`` in float64 and float32 (callables of the model)."""
    out = []
    for dtype in (torch.float64, torch.float32):
        with torch.no_grad():
            a, b = ours(dtype, x.to(dtype), *extra), theirs(dtype, x.to(dtype), *extra)
        assert a.shape == b.shape
        out.append(rel_diff(a.double(), b.double()))
    return out[0], out[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    """Labelled shards written by ``launch/make_shards.py``'s code, whose ``dataset.json`` names the classes."""
    tmp = tmp_path_factory.mktemp("hf_shards")
    files = make_class_folder(tmp / "images", per_class=3)
    write_shards(tmp / "images", str(tmp / "shards" / "train-%06d.tar"), workers=0, progress=False)
    return tmp / "shards", sorted(files)


DATA = dict(crop_pct=0.8, interpolation="bicubic", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])


def run_dir(tmp: Path, model: torch.nn.Module, spec: dict | None, shards: Path | None, extra: dict | None = None
            ) -> Path:
    """A run folder as our commands write it: weights via ``save_checkpoint``, ``model.json`` via
    ``write_model_json`` and the resolved ``config.yaml`` (data section, and what ``extra`` adds)."""
    import yaml

    run = tmp / "run"
    save_checkpoint(model, run / "best.safetensors")
    if spec is not None:
        write_model_json(spec, run)
    data = dict(DATA, train_urls=str(shards) if shards else "")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data, **(extra or {})}))
    return run


def convert_hf(checkpoint: Path, out: Path, *args: str) -> int:
    return convert.main([str(checkpoint), str(out), "--hf", *args])


def no_surprises(info: dict) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


# ------------------------------------------------------------------------------------------------- transformers in


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_transformers_classifier_loads_with_the_same_logits(tmp_path, version, capsys):
    theirs = hf_model(version, "classifier", [64, 96], num_labels=5)
    theirs.save_pretrained(tmp_path / "hf")
    spec = resolve_spec(tmp_path / "hf")  # the architecture from config.json: no model flags
    assert spec["options"]["num_classes"] == 5 and spec["options"]["img_size"] == [64, 96]
    ours = swinv2.create_model(spec["name"], checkpoint=tmp_path / "hf", **spec["options"]).eval()
    assert "checkpoint layout: transformers" in capsys.readouterr().out
    report = swinv2.load_checkpoint(ours, tmp_path / "hf")
    assert report.layout == "transformers" and not report.missing and not report.unexpected
    assert len(report.loaded) == len(ours.state_dict())
    x = torch.randn(2, 3, 64, 96)
    f64, f32 = agree(lambda d, x: ours.to(d)(x), lambda d, x: theirs.to(d)(pixel_values=x).logits, x)
    assert f64 < F64_TOL and f32 < F32_TOL, (f64, f32)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_transformers_masked_image_model_loads_with_the_same_loss_and_reconstruction(tmp_path, version):
    theirs = hf_model(version, "simmim", 64)
    theirs.save_pretrained(tmp_path / "hf")
    spec = resolve_spec(tmp_path / "hf")
    assert spec["options"]["num_classes"] == 0
    ours = simmim.SimMIM(swinv2.create_model(spec["name"], **spec["options"]))  # plain target, as transformers'
    report = simmim.load_checkpoint(ours, tmp_path / "hf")
    assert report.layout == "transformers" and not report.missing and not report.unexpected
    assert {"mask_token", "decoder.0.weight", "decoder.0.bias"} <= set(report.loaded)
    ours.eval()
    mask = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(3)) < 0.6
    for name, pick in (("loss", 0), ("reconstruction", 1)):
        f64, f32 = agree(
            lambda d, x, m, pick=pick: (ours.to(d)(x, m.long()), ours.predict(x, m.long()))[pick],
            lambda d, x, m, name=name: getattr(theirs.to(d)(pixel_values=x, bool_masked_pos=m.flatten(1)), name),
            torch.randn(2, 3, 64, 64), mask)
        assert f64 < (LOSS_F64_TOL if name == "loss" else F64_TOL) and f32 < F32_TOL, (name, f64, f32)


def test_pytorch_model_bin_is_read_weights_only_and_unmapped_keys_are_reported(tmp_path):
    theirs = hf_model("v2", "classifier", [64, 96], num_labels=5)
    theirs.save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    os.remove(tmp_path / "hf" / "model.safetensors")
    torch.save({**state, "swinv2.encoder.layers.0.blocks.0.attention.self.extra": torch.ones(3)},
               tmp_path / "hf" / "pytorch_model.bin")
    spec = resolve_spec(tmp_path / "hf")
    ours = swinv2.create_model(spec["name"], **spec["options"]).eval()
    report = swinv2.load_checkpoint(ours, tmp_path / "hf")
    assert report.unexpected == ["swinv2.encoder.layers.0.blocks.0.attention.self.extra"]  # reported, not dropped
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert rel_diff(ours(x), theirs(pixel_values=x).logits) < F32_TOL
    torch.save({**state, "evil": Path("x")}, tmp_path / "hf" / "pytorch_model.bin")  # a pickled object: refused
    with pytest.raises(ValueError, match="could run code"):
        swinv2.load_checkpoint(ours, tmp_path / "hf")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fine_tuning_starts_from_a_transformers_directory_at_a_higher_resolution_and_window(tmp_path, version):
    theirs = hf_model(version, "simmim", 32, window_size=2, pretrained_window_sizes=[0, 0, 0])
    theirs.save_pretrained(tmp_path / "hf")
    options = dict(ARCH, img_size=64, window_size=4, num_classes=7)
    if version == "v2":
        options["pretrained_window_sizes"] = [2, 2, 2]
    model = swinv2.create_model(NAMES[version], **options)
    report = load_pretrained(model, tmp_path / "hf")
    assert report.layout == "transformers"
    encoder = [k for k in model.state_dict() if not k.startswith("head.")]
    assert sorted(report.loaded) == sorted(encoder)  # every encoder weight loaded
    assert sorted(report.missing) == ["head.bias", "head.weight"] and not report.unexpected
    assert {"mask_token", "decoder.0.weight", "decoder.0.bias"} <= set(report.dropped)
    adapted = "\n".join(report.adapted)
    if version == "v2":
        assert "normalised by pretrained windows [(2, 2), (2, 2), (2, 2)]" in adapted
    else:
        assert "bias table (9, 2) -> (49, 2) (bicubic, window (4, 4))" in adapted
    hf_state = theirs.state_dict() if version == "v2" else load_file(str(tmp_path / "hf" / "model.safetensors"))
    base = "swinv2" if version == "v2" else "swin"
    qkv = torch.cat([hf_state[f"{base}.encoder.layers.1.blocks.1.attention.self.{r}.weight"]
                     for r in ("query", "key", "value")])
    torch.testing.assert_close(model.layers[1].blocks[1].attn.qkv.weight, qkv, rtol=0, atol=0)


def test_evaluate_command_takes_a_transformers_directory_without_model_flags(tmp_path, shards):
    folder, classes = shards
    theirs = hf_model("v2", "classifier", 64, num_labels=len(classes), window_size=4,
                      pretrained_window_sizes=[0, 0, 0])
    theirs.save_pretrained(tmp_path / "hf")
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "launch/evaluate.py", str(tmp_path / "hf"), "--data", str(folder),
                             "--workers", "0", "--batch", "4", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint layout: transformers" in result.stdout
    got = json.loads(out.read_text())
    cfg = DataConfig(eval_urls=str(folder), batch_size=4, num_workers=0)  # evaluate.py's defaults (crop_pct 0.875)
    logits, labels = [], []
    for batch in build_loader(cfg, "eval", rank=0, world_size=1, img_size=64):
        with torch.no_grad():
            logits.append(theirs(pixel_values=batch["image"]).logits.double())
        labels.append(batch["label"])
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert got["count"] == len(labels) == 3 * len(classes)
    assert got["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).double().mean().item())

    assert got["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)

def test_evaluate_names_its_data_option_when_the_shards_cannot_be_read(tmp_path):
    """A failing ``pipe:`` source is one sentence naming ``--data`` (the command's option), not a config key."""
    hf_model("v2", "classifier", 64, num_labels=3, window_size=4).save_pretrained(tmp_path / "hf")
    result = subprocess.run([sys.executable, "launch/evaluate.py", str(tmp_path / "hf"), "--data", "pipe:false",
                             "--workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --data: could not read pipe:false (exit status 1 and no data);")


# ------------------------------------------------------------------------------------------------- transformers out


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_converted_fine_tuning_run_loads_in_transformers_with_the_same_logits(tmp_path, version, shards):
    folder, classes = shards
    options = dict(ARCH, img_size=[64, 96], num_classes=len(classes))
    if version == "v2":
        options["pretrained_window_sizes"] = V2_PRETRAINED
    spec = {"name": NAMES[version], "options": options}
    ours = idle_double_mask_(randomize_(swinv2.create_model(spec["name"], **options))).eval()
    run = run_dir(tmp_path, ours, spec, folder)
    assert convert_hf(run / "best.safetensors", tmp_path / "out") == 0
    theirs, info = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out",
                                                                                output_loading_info=True)
    no_surprises(info)
    assert type(theirs).__name__ == ("Swinv2" if version == "v2" else "Swin") + "ForImageClassification"
    assert [theirs.config.id2label[i] for i in range(len(classes))] == classes  # from the shards' dataset.json
    theirs.eval()
    f64, f32 = agree(lambda d, x: ours.to(d)(x), lambda d, x: theirs.to(d)(pixel_values=x).logits,
                     torch.randn(2, 3, 64, 96))
    assert f64 < F64_TOL and f32 < F32_TOL, (f64, f32)


def test_converted_backbone_loads_with_automodel_with_the_same_features(tmp_path):
    options = dict(ARCH, img_size=64, num_classes=0, pretrained_window_sizes=V2_PRETRAINED)
    ours = idle_double_mask_(randomize_(swinv2.create_model(NAMES["v2"], **options))).eval()
    run = run_dir(tmp_path, ours, {"name": NAMES["v2"], "options": options}, None)
    assert convert_hf(run / "best.safetensors", tmp_path / "out") == 0
    theirs, info = transformers.AutoModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    no_surprises(info)
    theirs.eval()
    x = torch.randn(2, 3, 64, 64)

    def features(d, x):
        return ours.to(d).forward_features(x).flatten(1, 2)  # (B, H/16 * W/16, C), row-major as transformers'

    for pick, mine in (("last_hidden_state", features), ("pooler_output", lambda d, x: features(d, x).mean(1))):
        f64, f32 = agree(mine, lambda d, x, pick=pick: getattr(theirs.to(d)(pixel_values=x), pick), x)
        assert f64 < F64_TOL and f32 < F32_TOL, (pick, f64, f32)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_converted_simmim_run_loads_as_a_masked_image_model_and_a_backbone(tmp_path, version):
    section = dict(name=NAMES[version], img_size=64, **ARCH)  # the run's config.yaml model section, no model.json
    if version == "v2":
        section["pretrained_window_sizes"] = V2_PRETRAINED
    encoder = swinv2.create_model(NAMES[version], num_classes=0, **{k: v for k, v in section.items() if k != "name"})
    ours = idle_double_mask_(randomize_(simmim.SimMIM(encoder))).eval()  # the plain target, as transformers' loss
    run = run_dir(tmp_path, ours, None, None, {"model": section, "simmim": {"norm_target_patch_size": 0}})
    assert convert_hf(run / "best.safetensors", tmp_path / "out") == 0
    _, mim_class = _hf(version, "simmim")
    theirs, info = mim_class.from_pretrained(tmp_path / "out", output_loading_info=True)
    no_surprises(info)
    theirs.eval()
    mask = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(5)) < 0.6
    x = torch.randn(2, 3, 64, 64)
    for name, pick in (("loss", 0), ("reconstruction", 1)):
        f64, f32 = agree(
            lambda d, x, m, pick=pick: (ours.to(d)(x, m.long()), ours.predict(x, m.long()))[pick],
            lambda d, x, m, name=name: getattr(theirs.to(d)(pixel_values=x, bool_masked_pos=m.flatten(1)), name),
            x, mask)
        assert f64 < (LOSS_F64_TOL if name == "loss" else F64_TOL) and f32 < F32_TOL, (name, f64, f32)
    backbone, info = transformers.AutoModel.from_pretrained(tmp_path / "out" / "backbone", output_loading_info=True)
    no_surprises(info)
    backbone.eval()
    f64, f32 = agree(lambda d, x: ours.encoder.to(d).forward_features(x).flatten(1, 2),
                     lambda d, x: backbone.to(d)(pixel_values=x).last_hidden_state, x)
    assert f64 < F64_TOL and f32 < F32_TOL, (f64, f32)


def test_image_processor_is_the_evaluation_transform(tmp_path):
    options = dict(ARCH, img_size=64, num_classes=3, pretrained_window_sizes=V2_PRETRAINED)
    ours = swinv2.create_model(NAMES["v2"], **options)
    run = run_dir(tmp_path, ours, {"name": NAMES["v2"], "options": options}, None)
    assert convert_hf(run / "best.safetensors", tmp_path / "out") == 0
    # 120x96 -> shorter side floor(64 / 0.8) = 80, so 100x80; both crop margins even (see the README on rounding)
    image = Image.fromarray(torch.randint(0, 256, (96, 120, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    want = eval_transform(DataConfig(**DATA), 64)(image)
    pil = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out", backend="pil")
    got = pil(images=image, return_tensors="pt")["pixel_values"][0]
    assert got.shape == want.shape == (3, 64, 64)
    assert (got - want).abs().max().item() < 1e-5  # PIL's resize on both sides: the same pixels
    default = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out")  # torchvision backend
    got = default(images=image, return_tensors="pt")["pixel_values"][0]
    # torch's bicubic resize rounds some pixels to the neighbouring grey level: the same transform, within one level
    grey_level = 1 / 255 / min(DATA["std"])
    assert (got - want).abs().max().item() <= grey_level + 1e-6 and (got - want).abs().mean().item() < 1e-3


def test_transformers_adds_the_shift_mask_twice(tmp_path, monkeypatch):
    """Where the double mask is not idle (logit scales at the clamp), transformers' Swin V2 differs from ours (and
    the paper's -100, arXiv 2103.14030 sec. 3.2) by far more than rounding, and agrees with ours to float64 rounding
    once ours adds -200 too: the mask is the whole difference."""
    theirs = perturb_(hf_model("v2", "classifier", [64, 96], num_labels=5))  # perturbed again: every scale past 20
    with torch.no_grad():
        for module in theirs.modules():
            if type(module).__name__ == "Swinv2SelfAttention":
                module.logit_scale.fill_(math.log(100.0))
    theirs.save_pretrained(tmp_path / "hf")
    spec = resolve_spec(tmp_path / "hf")
    ours = swinv2.create_model(spec["name"], checkpoint=tmp_path / "hf", **spec["options"]).eval().double()
    theirs.double()
    x = torch.randn(4, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 3
    with torch.no_grad():
        want = theirs(pixel_values=x).logits
        paper = rel_diff(ours(x), want)
        monkeypatch.setattr(swinv2.attention, "SHIFT_MASK_VALUE", 2 * swinv2.attention.SHIFT_MASK_VALUE)
        doubled = rel_diff(ours(x), want)
    assert paper > 1e-6 and doubled < F64_TOL, (paper, doubled)


def test_models_transformers_cannot_express_stop_with_one_sentence(tmp_path, capsys):
    cases = {
        "extra main-branch LayerNorm": dict(img_size=64, extra_norm_every=1),
        "clips windows to small or non-square stages differently": dict(img_size=[32, 64], window_size=4),
    }
    for i, (needle, change) in enumerate(cases.items()):
        options = {**ARCH, "num_classes": 3, **change}
        model = swinv2.create_model(NAMES["v2"], **options)
        run = run_dir(tmp_path / str(i), model, {"name": NAMES["v2"], "options": options}, None)
        assert convert_hf(run / "best.safetensors", tmp_path / str(i) / "out") == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / str(i) / "out" / "config.json").exists()  # nothing half-written


def test_converting_a_transformers_directory_writes_ours_and_its_model_json(tmp_path):
    theirs = hf_model("v2", "simmim", 64)
    theirs.save_pretrained(tmp_path / "hf")
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    spec = json.loads((tmp_path / "ours" / "model.json").read_text())
    ours = simmim.SimMIM(swinv2.create_model(spec["name"], **spec["options"]))
    report = simmim.load_checkpoint(ours, tmp_path / "ours" / "model.safetensors")
    assert not report.missing and not report.unexpected
    encoder = load_file(str(tmp_path / "ours" / "encoder.safetensors"))
    assert set(encoder) == set(ours.encoder.state_dict())


def test_import_swinv2_leaves_transformers_unimported():
    code = ("import sys, swinv2, swinv2.layouts, swinv2.hf_layout, swinv2.export, swinv2.commands.convert, simmim; "
            "sys.exit('transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=300).returncode == 0
