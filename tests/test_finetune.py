"""Fine-tuning and evaluation: the recipe defaults against the SimMIM paper's (arXiv 2111.09886 sec. 4.1); every
fine-tune config builds at its window; layer-wise LR decay of a fine-tune config against the layer-decay formula
written out; exact evaluation counts and metrics;
the best-checkpoint keeper; Mixup/label-smoothing losses against hand formulas; an authors'-layout SimMIM
checkpoint into a classifier at twice the resolution. The end-to-end and distributed runs are in
tests/test_finetune_e2e.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from data_helpers import labelled_shards
from safetensors import safe_open

import simmim
import swinv2
from simmim.config import PretrainConfig
from simmim.pretrain import build_simmim
from swinv2.data import DataConfig, build_loader
from swinv2.finetune.best_weights import BestKeeper
from swinv2.finetune.config import load_finetune_config
from swinv2.finetune.evaluation import evaluate
from swinv2.finetune.run import build_criterion, build_mixup
from swinv2.finetune.weights import (
    WeightsError,
    build_classifier,
    load_pretrained,
    model_spec,
    resolve_spec,
    write_model_json,
)
from swinv2.train.config import ConfigError, load_config
from swinv2.train.engine import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
FINETUNE_CONFIGS = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))
URLS = ["data.train_urls=train.tar", "data.eval_urls=val.tar"]  # the shipped big configs leave the data to the user


def test_defaults_are_the_simmim_papers_fine_tuning_recipe():
    cfg = load_finetune_config(None, URLS)
    assert (cfg.optim.base_lr, cfg.optim.min_lr, cfg.optim.warmup_lr) == (1.25e-3, 2.5e-7, 2.5e-7)
    assert cfg.optim.layer_decay == 0.75 and cfg.optim.weight_decay == 0.05 and cfg.optim.lr_batch_reference == 512
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.kind) == (100, 20, "cosine")
    assert cfg.model.drop_path_rate == 0.1 and cfg.mixup.label_smoothing == 0.1
    assert (cfg.mixup.mixup_alpha, cfg.mixup.cutmix_alpha) == (0.8, 1.0)
    assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.re_prob == 0.25
    assert (cfg.model.img_size, cfg.model.window_size, cfg.model.pretrained_window_sizes) == (224, 14, [12, 12, 12, 6])
    assert not hasattr(cfg.data, "img_size")  # one image size: the model's, handed to the data pipeline


def test_there_are_fine_tune_configs_for_b_and_l_at_every_target():
    names = {p.stem for p in FINETUNE_CONFIGS}
    assert {f"swinv2_{s}_192to{r}" for s in ("base", "large") for r in (224, 256, 384)} | {"demo"} <= names


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: p.stem)
def test_fine_tune_config_loads_and_builds_at_its_window(path):
    cfg = load_finetune_config(path, URLS)
    with torch.device("meta"):
        model = build_classifier(cfg.model)
    size, window = cfg.model.img_size, cfg.model.window_size
    grids = [size // 4 // 2**s for s in range(4)]
    assert model.stage_windows == [(min(window, g),) * 2 for g in grids]  # the last stage clips to its feature map
    pretrained = [stage.blocks[0].attn.pretrained_window for stage in model.layers]
    assert pretrained == [tuple([w, w]) for w in cfg.model.pretrained_window_sizes]
    assert model.head.out_features == cfg.model.num_classes
    assert cfg.deepspeed.global_batch % cfg.data.batch_size == 0
    if path.stem == "small_data":  # fine-tunes configs/simmim/small_data.yaml's pretraining at the same size
        pretraining = load_config(PretrainConfig, ROOT / "configs" / "simmim" / "small_data.yaml")
        with torch.device("meta"):
            windows = [w for w, _ in build_simmim(pretraining).encoder.stage_windows]
        assert cfg.model.pretrained_window_sizes == windows and pretraining.model.img_size == size
    elif path.stem != "demo":
        assert cfg.model.pretrained_window_sizes == [12, 12, 12, 6] and cfg.deepspeed.global_batch == 2048
        assert cfg.optim.base_lr == 1.25e-3 and cfg.optim.layer_decay == 0.75  # the recipe, not overridden


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["ema.enabled=true", "deepspeed.zero_stage=3"], "ema.enabled"),
        (["data.batch_size=63"], "data.batch_size must be even"),
        (["data.eval_urls=''"], "data.eval_urls is empty"),
        (["model.num_classes=0"], "model.num_classes"),
        (["mixup.mode=row"], "mixup.mode"),
        (["model.num_class=5"], "model.num_class"),
    ],
)
def test_bad_fine_tune_config_names_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_finetune_config(None, URLS + overrides)


def test_shared_and_fine_tune_problems_come_in_one_message():
    """A shared check and a fine-tune check that both fail are reported together, so one edit fixes both."""
    with pytest.raises(ConfigError) as caught:
        load_finetune_config(None, URLS + ["optim.base_lr=0", "model.num_classes=0"])
    assert "optim.base_lr must be positive" in str(caught.value) and "model.num_classes" in str(caught.value)


def test_layer_decay_of_the_fine_tune_optimizer_follows_the_spec_formula():
    """Every parameter of a V2-T built from a fine-tune config gets decay ** (num_layers - 1 - layer), once."""
    cfg = load_finetune_config(None, URLS + ["model.name=swinv2_tiny_window8_256", "model.img_size=256",
                                             "model.window_size=16", "model.pretrained_window_sizes=[8,8,8,8]"])
    model = build_classifier(cfg.model)
    depths, decay = (2, 2, 6, 2), 0.75
    num_layers = sum(depths) + 2

    def spec_layer(name: str) -> int:  # the layer-decay rule (docs/finetuning.md), written out by name
        parts = name.split(".")
        if parts[0] == "patch_embed":
            return 0
        if parts[0] == "layers" and parts[2] == "blocks":
            return sum(depths[: int(parts[1])]) + int(parts[3]) + 1
        if parts[0] == "layers" and parts[2] == "downsample":
            return sum(depths[: int(parts[1]) + 1])
        return num_layers - 1

    optimizer = build_optimizer(model, cfg, lr=1.0)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr_scale"] == pytest.approx(decay ** (num_layers - 1 - spec_layer(name))), name
            seen.add(name)
    assert seen == set(names.values())
    assert min(g["lr_scale"] for g in optimizer.param_groups) == pytest.approx(decay ** (num_layers - 1))


def test_mixup_targets_and_losses_match_hand_formulas():
    cfg = load_finetune_config(None, URLS + ["model.num_classes=5"])
    mixup, criterion = build_mixup(cfg), build_criterion(cfg)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, targets = mixup(images.clone(), labels)
    assert targets.shape == (4, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets.min() >= 0.1 / 5 - 1e-6  # label smoothing puts at least eps / classes everywhere
    logits = torch.randn(4, 5)
    torch.testing.assert_close(criterion(logits, targets), (-targets * logits.log_softmax(1)).sum(1).mean())

    plain = load_finetune_config(None, URLS + ["model.num_classes=5", "mixup.mixup_alpha=0", "mixup.cutmix_alpha=0"])
    assert build_mixup(plain) is None
    logp = logits.log_softmax(1)
    want = (0.9 * -logp[torch.arange(4), labels] + 0.1 * -logp.mean(1)).mean()
    torch.testing.assert_close(build_criterion(plain)(logits, labels), want)


TINY32 = dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), num_classes=3,
              drop_path_rate=0.0)


@pytest.fixture
def uneven_shards(tmp_path):
    """Three shards of 7, 3 and 5 labelled images: two ranks get 7 + 5 = 12 and 3."""
    paths, labels = labelled_shards(tmp_path / "shards", [7, 3, 5])
    return "::".join(paths), labels


def _eval_cfg(urls: str, batch: int) -> DataConfig:
    return DataConfig(eval_urls=urls, batch_size=batch, num_workers=0, crop_pct=1.0)


def test_evaluate_counts_every_sample_once_and_matches_a_per_sample_computation(uneven_shards):
    urls, labels = uneven_shards
    model = randomize_(swinv2.create_model("swinv2_tiny_window8_256", **TINY32)).eval()
    got = evaluate(model, build_loader(_eval_cfg(urls, 4), "eval", rank=0, world_size=1, img_size=32), "cpu")
    # independent: one image at a time, metrics by hand in float64
    logits, targets = [], []
    for batch in build_loader(_eval_cfg(urls, 1), "eval", rank=0, world_size=1, img_size=32):
        with torch.no_grad():
            logits.append(model(batch["image"]).double())
        targets.append(batch["label"])
    logits, targets = torch.cat(logits), torch.cat(targets)
    assert got["count"] == len(labels) == 15
    assert got["top1"] == pytest.approx(100 * (logits.argmax(1) == targets).double().mean().item())
    assert got["top5"] == 100.0  # three classes: the top "5" holds all of them
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    # ranks of an uneven split add up to the whole (each rank's share evaluated alone, then weighted)
    parts = [evaluate(model, build_loader(_eval_cfg(urls, 4), "eval", rank=r, world_size=2, img_size=32), "cpu")
             for r in (0, 1)]
    assert [p["count"] for p in parts] == [12, 3]
    assert sum(p["top1"] * p["count"] for p in parts) / 15 == pytest.approx(got["top1"])
    # lockstep (the ZeRO-3 path) counts the same
    lock = evaluate(model, build_loader(_eval_cfg(urls, 4), "eval", rank=0, world_size=1, img_size=32), "cpu",
                    lockstep=True)
    assert lock["count"] == 15 and lock["top1"] == pytest.approx(got["top1"])


def test_evaluate_restores_training_mode(uneven_shards):
    model = swinv2.create_model("swinv2_tiny_window8_256", **TINY32).train()
    evaluate(model, build_loader(_eval_cfg(uneven_shards[0], 8), "eval", rank=0, world_size=1, img_size=32), "cpu")
    assert model.training


def test_best_keeper_keeps_the_best_and_survives_a_resume(tmp_path):
    weights = {"w": torch.zeros(2)}
    keeper = BestKeeper(tmp_path, rank=0)
    for top1, value in [(10.0, 1.0), (5.0, 2.0), (12.5, 3.0), (12.5, 4.0)]:
        keeper.offer(top1, lambda v=value: {"w": weights["w"] + v}, {"epoch": value, "weights": "model"})
        keeper.record({"eval/top1": top1})
    with safe_open(str(tmp_path / "best.safetensors"), "pt") as f:
        assert f.get_tensor("w").tolist() == [3.0, 3.0]  # the first 12.5, not the tie after it
        assert f.metadata()["top1"] == "12.5" and f.metadata()["epoch"] == "3.0"
    assert json.loads((tmp_path / "best.json").read_text())["top1"] == 12.5
    assert [e["eval/top1"] for e in json.loads((tmp_path / "metrics.json").read_text())] == [10.0, 5.0, 12.5, 12.5]
    assert not list(tmp_path.glob(".*.tmp"))
    assert BestKeeper(tmp_path, rank=0, resumed=True).best_top1 == 12.5
    assert BestKeeper(tmp_path, rank=0, resumed=False).best_top1 == -math.inf  # a fresh run starts over


def test_model_json_is_found_from_any_checkpoint_of_the_run(tmp_path):
    cfg = load_finetune_config(ROOT / "configs" / "finetune" / "demo.yaml")
    write_model_json(model_spec(cfg.model), tmp_path)
    step = tmp_path / "checkpoints" / "step00000010"
    step.mkdir(parents=True)
    spec = resolve_spec(step)
    assert spec["name"] == cfg.model.name and spec["options"]["window_size"] == cfg.model.window_size
    assert "drop_path_rate" not in spec["options"]  # training-only options stay out
    assert resolve_spec(tmp_path / "best.safetensors", num_classes=7)["options"]["num_classes"] == 7
    with pytest.raises(ValueError, match="--model"):
        resolve_spec(tmp_path.parent / "elsewhere.pth")


def test_missing_pretrained_weights_are_one_sentence(tmp_path):
    model = swinv2.create_model("swinv2_tiny_window8_256", **TINY32)
    with pytest.raises(WeightsError, match="do not exist.*pretrained= starts from scratch"):
        load_pretrained(model, tmp_path / "nope")


def _coords_max(window: int, pretrained: int) -> float:
    """Swin V2 arXiv 2111.09883 sec. 3.3: the largest offset (window - 1) / (pretrained - 1), times 8, log-spaced."""
    t = (window - 1) / (pretrained - 1) * 8
    return math.log2(1 + t) / math.log2(8)


def test_authors_simmim_checkpoint_loads_into_a_classifier_at_twice_the_resolution(tmp_path):
    tiny = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
    source = randomize_(simmim.SimMIM(swinv2.create_model("swinv2_tiny_window8_256", img_size=64, window_size=4,
                                                          num_classes=0, **tiny)))
    # the authors' layout, renamed from ours: mask token on the encoder, everything under "model"
    state = {("encoder.mask_token" if k == "mask_token" else k): v.clone() for k, v in source.state_dict().items()}
    assert {"decoder.0.weight", "encoder.mask_token"} <= set(state)
    torch.save({"model": state, "epoch": 799}, tmp_path / "simmim_authors.pth")

    # 64 px / window 4 (stage windows 4, 4, 4, 2) -> 128 px / window 8 (8, 8, 8, 4)
    model = swinv2.create_model("swinv2_tiny_window8_256", img_size=128, window_size=8,
                                pretrained_window_sizes=(4, 4, 4, 2), num_classes=10, **tiny)
    report = load_pretrained(model, tmp_path / "simmim_authors.pth")
    assert report.layout == "SimMIM (encoder)"
    assert sorted(report.dropped) == ["decoder.0.bias", "decoder.0.weight", "encoder.mask_token"]
    assert report.missing == ["head.weight", "head.bias"] and not report.unexpected
    adapted = "\n".join(report.adapted)
    assert "[(8, 8), (8, 8), (8, 8), (4, 4)]" in adapted and "[(4, 4), (4, 4), (4, 4), (2, 2)]" in adapted
    encoder = source.encoder.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, encoder[key]), key
    # the coordinate tables are rebuilt for the new windows, normalised by the pretrained ones
    for stage, (window, pretrained) in enumerate([(8, 4), (8, 4), (8, 4), (4, 2)]):
        table = model.layers[stage].blocks[0].attn.relative_coords_table
        assert table.shape[:2] == (2 * window - 1, 2 * window - 1)
        assert table.max().item() == pytest.approx(_coords_max(window, pretrained), rel=1e-6)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 128, 128))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_evaluate_sees_weights_written_through_data(uneven_shards):
    """DeepSpeed writes optimizer updates through ``param.data``, invisible to the V2 position-bias cache; an
    evaluation in the training process must still use the current weights."""
    urls = uneven_shards[0]
    model = randomize_(swinv2.create_model("swinv2_tiny_window8_256", **TINY32))
    loader = build_loader(_eval_cfg(urls, 8), "eval", rank=0, world_size=1, img_size=32)
    before = evaluate(model, loader, "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".cpb_mlp." in name:
                p.data.copy_(torch.randn_like(p))  # as DeepSpeed's ZeRO optimizers do
    fresh = swinv2.create_model("swinv2_tiny_window8_256", **TINY32)
    fresh.load_state_dict(model.state_dict())
    after, want = evaluate(model, loader, "cpu"), evaluate(fresh, loader, "cpu")
    assert after["loss"] == pytest.approx(want["loss"], rel=1e-6) and after["loss"] != pytest.approx(before["loss"])


def test_missing_pretrained_path_stops_before_writing_anything(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_finetune", ROOT / "launch" / "finetune.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    out = tmp_path / "run"
    assert launch.main([f"pretrained={tmp_path / 'runs' / 'demo'}", f"run.output_dir={out}"]) == 2
    assert "do not exist" in capsys.readouterr().err
    assert not out.exists()
