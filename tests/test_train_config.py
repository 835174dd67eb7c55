"""The config base and its sections: both run schemas are :class:`TrainConfig`s, every shipped YAML loads with its
schema, each section names its own bad keys, the config adds the checks across sections, and
``ModelConfig.create_kwargs`` builds the models the runs built by hand before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import swinv2
from simmim.config import PretrainConfig, ProbeConfig, SimMIMConfig
from simmim.pretrain import build_simmim
from swinv2.finetune.config import ClassifierConfig, EmaConfig, FinetuneConfig, MixupConfig
from swinv2.finetune.weights import build_classifier, model_spec
from swinv2.train.config import (
    ConfigError,
    DeepSpeedConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    WandbConfig,
    load_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
YAMLS = sorted(CONFIG_DIR.rglob("*.yaml"))


def schema_of(path: Path) -> type[TrainConfig]:
    return FinetuneConfig if "finetune" in path.relative_to(CONFIG_DIR).parts else PretrainConfig


def test_both_schemas_are_train_configs():
    assert issubclass(PretrainConfig, TrainConfig) and issubclass(FinetuneConfig, TrainConfig)
    assert issubclass(ClassifierConfig, ModelConfig)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_yaml_loads_with_its_schema(path):
    cfg = load_config(schema_of(path), path)
    assert isinstance(cfg, schema_of(path)) and cfg.problems() == []
    assert type(cfg.model) is (ClassifierConfig if isinstance(cfg, FinetuneConfig) else ModelConfig)


def test_subclass_defaults_and_sections_survive_the_merge():
    """OmegaConf merges the subclass's own defaults and sections over the inherited fields."""
    pre, fine = load_config(PretrainConfig), load_config(FinetuneConfig)
    assert pre.wandb.project == "swinv2-simmim" and fine.wandb.project == "swinv2-finetune"
    assert pre.schedule.kind == "multistep" and fine.schedule.kind == "cosine"
    assert pre.simmim.mask_ratio == 0.6 and fine.model.num_classes == 1000 and fine.mixup.mixup_alpha == 0.8
    with pytest.raises(ConfigError, match="model.num_classes"):  # the pretraining encoder has no head
        load_config(PretrainConfig, None, ["model.num_classes=10"])


@pytest.mark.parametrize("section, needle", [
    (ModelConfig(img_size=30), "model.img_size=30 must be a multiple of the patch size 4"),
    (ModelConfig(window_size=0), "model.window_size=0 must be positive"),
    (ModelConfig(window_size=-7), "model.window_size=-7 must be positive"),
    (ModelConfig(name="swinv2_base_window12_129"), "e.g. swinv2_base_window12_192"),
    (ModelConfig(depths=[2, 2], num_heads=[2, 4, 8]), "model.depths=[2, 2] and model.num_heads=[2, 4, 8] must have"),
    (ModelConfig(num_heads=[4, 0, 16, 32]), "at least one head each"),  # the base variant's four depths
    (ModelConfig(embed_dim=16, num_heads=[3, 3, 3, 3]), "model.num_heads=[3, 3, 3, 3] must divide each stage's width "
                                                        "[16, 32, 64, 128]"),
    (OptimConfig(betas=(0.9, 1.0)), "optim.betas=[0.9, 1.0] must be two numbers in [0, 1)"),
    (OptimConfig(betas=(-0.1, 0.999)), "optim.betas=[-0.1, 0.999] must be two numbers in [0, 1)"),
    (ClassifierConfig(num_classes=0), "model.num_classes must be positive"),
    (OptimConfig(base_lr=0), "optim.base_lr must be positive"),
    (OptimConfig(layer_decay=1.5), "optim.layer_decay must be in (0, 1]"),
    (ScheduleConfig(kind="linear"), "schedule.kind must be one of multistep, cosine"),
    (ScheduleConfig(epochs=10, warmup_epochs=20), "schedule.warmup_epochs must be between 0 and schedule.epochs"),
    (DeepSpeedConfig(zero_stage=5), "deepspeed.zero_stage must be 0, 1, 2 or 3"),
    (DeepSpeedConfig(offload_params=True, zero_stage=2), "deepspeed.offload_params needs deepspeed.zero_stage=3"),
    (WandbConfig(mode="sometimes"), "wandb.mode must be one of online, offline, disabled"),
    (RunConfig(profile_steps=[5, 2]), "run.profile_steps=[5, 2] must be [first, last]"),
    (RunConfig(output_dir=" "), "run.output_dir is empty: set it to this run's own folder"),
    (SimMIMConfig(mask_ratio=1.0), "simmim.mask_ratio must be in (0, 1)"),
    (SimMIMConfig(mask_patch_size=0), "simmim.mask_patch_size must be positive"),
    (ProbeConfig(train_urls="a"), "probe.train_urls and probe.eval_urls go together"),
    (MixupConfig(mode="pixel"), "mixup.mode must be one of batch, pair, elem"),
    (EmaConfig(decay=1.0), "ema.decay must be in (0, 1)"),
], ids=lambda x: type(x).__name__ if not isinstance(x, str) else "")
def test_a_section_names_its_bad_key(section, needle):
    problems = section.problems()
    assert len(problems) == 1 and needle in problems[0]


def test_config_problems_are_the_sections_then_across_sections():
    cfg = FinetuneConfig(optim=OptimConfig(base_lr=0), mixup=MixupConfig(mode="x"),
                         deepspeed=DeepSpeedConfig(zero_stage=3), ema=EmaConfig(enabled=True))
    problems = cfg.problems()
    assert problems[0] == "optim.base_lr must be positive" and problems[1].startswith("mixup.mode")
    assert problems[-1].startswith("ema.enabled needs whole weights") and len(problems) == 3
    pre = PretrainConfig(run=RunConfig(on_nonfinite="skip"), deepspeed=DeepSpeedConfig(zero_stage=0, precision="fp32"),
                         model=ModelConfig(img_size=100))
    assert [p.split(" ")[0] for p in pre.problems()] == ["run.on_nonfinite=skip", "model.img_size=100"]
    with pytest.raises(ConfigError, match=r"run\.on_nonfinite=skip .*; model\.img_size=100 .*\.$"):
        load_config(PretrainConfig, None, ["run.on_nonfinite=skip", "deepspeed.zero_stage=0",
                                           "deepspeed.precision=fp32", "model.img_size=100"])


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_create_kwargs_builds_the_pretraining_encoder_as_written_by_hand():
    cfg = load_config(PretrainConfig, CONFIG_DIR / "demo.yaml", ["model.checkpoint_activations=true"])
    with torch.device("meta"):
        ours = build_simmim(cfg).encoder
        hand = swinv2.create_model("swinv2_tiny_window8_256", num_classes=0, img_size=64, window_size=4, embed_dim=32,
                                   depths=[2, 2, 4, 2], num_heads=[2, 4, 8, 16], drop_path_rate=0.0,
                                   checkpoint_activations=True, attn_chunk_size=None)
    assert _shapes(ours) == _shapes(hand) and all(stage.checkpoint_activations for stage in ours.layers)


def test_create_kwargs_builds_the_classifier_as_written_by_hand():
    cfg = load_config(FinetuneConfig, CONFIG_DIR / "finetune" / "demo.yaml", ["model.attn_chunk_size=2"])
    with torch.device("meta"):
        ours = build_classifier(cfg.model)
        hand = swinv2.create_model("swinv2_tiny_window8_256", num_classes=10, img_size=96, window_size=6,
                                   pretrained_window_sizes=[4, 4, 4, 2], embed_dim=32, depths=[2, 2, 4, 2],
                                   num_heads=[2, 4, 8, 16], drop_path_rate=0.0, attn_chunk_size=2)
    assert _shapes(ours) == _shapes(hand)
    # model.json holds only what shapes the weights or the forward pass
    assert model_spec(cfg.model) == {"name": "swinv2_tiny_window8_256", "options": {
        "num_classes": 10, "img_size": 96, "window_size": 6, "pretrained_window_sizes": [4, 4, 4, 2],
        "embed_dim": 32, "depths": [2, 2, 4, 2], "num_heads": [2, 4, 8, 16]}}


def test_a_yaml_that_is_not_a_mapping_of_sections_is_one_sentence(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- optim\n")
    with pytest.raises(ConfigError, match=r"list.yaml' holds a list, not a mapping of sections"):
        load_config(PretrainConfig, listed)
    garbage = tmp_path / "bytes.yaml"
    garbage.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match=r"bytes.yaml' cannot be read as a config"):
        load_config(PretrainConfig, garbage)


def test_an_override_that_is_not_valid_yaml_is_one_sentence_naming_it():
    """The value of key=value is parsed as YAML: an unclosed bracket was a 37-line parser traceback."""
    with pytest.raises(ConfigError, match=r"^override 'model.depths=\[1,1' is not a valid value \(while parsing a "
                                          r"flow sequence\): quote or bracket it as YAML"):
        load_config(FinetuneConfig, None, ["optim.base_lr=1e-3", "model.depths=[1,1"])
