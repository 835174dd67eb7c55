"""Training set-up: every shipped config loads and builds; config errors; no-decay and layer-decay groups against
hand-derived sets (Swin V2 and SimMIM papers, docs/finetuning.md); the LR schedule against hand-computed values;
DeepSpeed config derivation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import swinv2
from simmim import SimMIM
from simmim.config import PretrainConfig
from simmim.pretrain import build_simmim
from swinv2.data import DataConfig
from swinv2.finetune.config import FinetuneConfig
from swinv2.train.config import ConfigError, load_config
from swinv2.train.engine import accumulation_steps, deepspeed_config, scaled_lrs, slurm_env
from swinv2.train.optim import StepSchedule, layer_ids, lr_at, no_weight_decay_params, param_groups

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = [CONFIG_DIR / "demo.yaml", *sorted((CONFIG_DIR / "simmim").glob("*.yaml"))]  # pretraining configs


def test_there_are_configs_for_every_size():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "swinv2_tiny_192", "swinv2_small_192", "swinv2_base_192", "swinv2_large_192",
            "swinv2_huge_192", "swinv2_giant_192", "swin_base_192"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds_on_meta(path):
    cfg = load_config(PretrainConfig, path)
    with torch.device("meta"):
        model = build_simmim(cfg)
    assert isinstance(model, SimMIM)
    assert model.encoder.img_size == (cfg.model.img_size, cfg.model.img_size)
    # the global batch must split into micro batches on some world size
    assert cfg.deepspeed.global_batch % cfg.data.batch_size == 0


@pytest.mark.slow  # four fake forwards of SwinV2-G
def test_giant_config_fits_an_80gb_gpu_by_the_planner():
    """The giant config's micro batch and ZeRO stage come from ``launch/plan.py --search`` on A100-80GB."""
    from simmim.plan import simmim_recipe
    from swinv2.plan.gpus import GPUS
    from swinv2.plan.planner import Cluster
    from swinv2.plan.search import plan_config

    cfg = load_config(PretrainConfig, next(p for p in CONFIGS if p.stem == "swinv2_giant_192"))
    plan = plan_config(cfg, simmim_recipe, Cluster(GPUS["a100-80gb"], world=128))
    assert plan.fits and plan.max_micro_batch >= cfg.data.batch_size


def test_overrides_apply_with_types():
    cfg = load_config(PretrainConfig, None, ["optim.base_lr=2e-4", "model.depths=[1,1,2,1]", "resume=false"])
    assert cfg.optim.base_lr == 2e-4 and cfg.model.depths == [1, 1, 2, 1] and cfg.resume is False


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lr=1"], "optim.lr"),
        (["data.batch_size=abc"], "data.batch_size"),
        (["deepspeed.zero_stage=5"], "deepspeed.zero_stage"),
        (["schedule.kind=linear"], "schedule.kind"),
        (["wandb.mode=sometimes"], "wandb.mode"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["optim.base_lr"], "key=value"),
    ],
)
def test_bad_config_names_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(PretrainConfig, None, overrides)


@pytest.mark.parametrize("schema", [PretrainConfig, FinetuneConfig])
def test_data_img_size_is_refused_naming_the_key(tmp_path, schema):
    """One image size, the model's: a YAML or override still setting data.img_size fails at start-up naming it."""
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text("data:\n  img_size: 224\n")
    for path, overrides in ((yaml_file, []), (None, ["data.img_size=224"])):
        with pytest.raises(ConfigError) as error:
            load_config(schema, path, overrides)
        message = str(error.value)
        assert "data.img_size" in message and "\n" not in message
    with pytest.raises(ValueError, match="data.img_size is not a data option"):
        DataConfig.coerce({"img_size": 224})


def test_missing_config_file_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")


def _tiny(name: str, **kw) -> torch.nn.Module:
    return swinv2.create_model(name, num_classes=10, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), **kw)


def test_no_weight_decay_set_v2_simmim():
    model = SimMIM(swinv2.create_model("swinv2_tiny_window8_256", num_classes=0, img_size=64, window_size=4,
                                       embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)))
    expected = set()
    for name, p in model.named_parameters():  # the no-decay list (docs/pretraining.md), written out by name
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 1 or leaf in ("logit_scale", "mask_token") or ".cpb_mlp." in name:
            expected.add(name)
    got = {name for name, p in model.named_parameters() if id(p) in no_weight_decay_params(model)}
    assert got == expected
    assert "mask_token" in got and any(".cpb_mlp.0.weight" in n for n in got) and any("logit_scale" in n for n in got)
    assert "encoder.layers.0.blocks.0.attn.qkv.weight" not in got


def test_no_weight_decay_set_v1_with_ape():
    model = _tiny("swin_tiny_patch4_window7_224", ape=True)
    got = {name for name, p in model.named_parameters() if id(p) in no_weight_decay_params(model)}
    expected = {n for n, p in model.named_parameters()
                if p.ndim == 1 or n.endswith("relative_position_bias_table") or n == "absolute_pos_embed"}
    assert got == expected


def test_layer_decay_groups_follow_the_spec_formula_for_v2_tiny():
    model = swinv2.create_model("swinv2_tiny_window8_256", num_classes=10)
    depths = (2, 2, 6, 2)
    num_layers = sum(depths) + 2
    decay = 0.75

    def spec_layer(name: str) -> int:  # the layer-decay rule (docs/finetuning.md), by name
        if name.startswith(("patch_embed", "absolute_pos_embed", "mask_token")):
            return 0
        if name.startswith("layers."):
            s = int(name.split(".")[1])
            if ".blocks." in name:
                return sum(depths[:s]) + int(name.split(".")[3]) + 1
            if ".downsample." in name:
                return sum(depths[: s + 1])
        return num_layers - 1

    ids = layer_ids(model)
    groups = param_groups(model, weight_decay=0.05, layer_decay=decay)
    seen = 0
    for group in groups:
        for name, p in zip(group["names"], group["params"], strict=True):
            layer = spec_layer(name)
            assert ids[id(p)] == layer, name
            assert group["lr_scale"] == pytest.approx(decay ** (num_layers - 1 - layer)), name
            seen += 1
    assert seen == len(list(model.parameters()))
    assert max(ids.values()) == num_layers - 1


def test_lr_schedule_hand_values():
    common = dict(total_steps=100, warmup_steps=10, base_lr=1.0, warmup_lr=0.1, min_lr=0.01)
    assert lr_at(0, kind="cosine", **common) == pytest.approx(0.1)
    assert lr_at(5, kind="cosine", **common) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(10, kind="cosine", **common) == pytest.approx(1.0)
    assert lr_at(55, kind="cosine", **common) == pytest.approx(0.01 + 0.99 * 0.5)  # half way: cos = 0
    assert lr_at(100, kind="cosine", **common) == pytest.approx(0.01)
    assert lr_at(69, kind="multistep", milestones=[70, 90], gamma=0.1, **common) == pytest.approx(1.0)
    assert lr_at(70, kind="multistep", milestones=[70, 90], gamma=0.1, **common) == pytest.approx(0.1)
    assert lr_at(95, kind="multistep", milestones=[70, 90], gamma=0.1, **common) == pytest.approx(0.01)


def test_step_schedule_applies_lr_scale_once_and_resumes():
    model = _tiny("swinv2_tiny_window8_256", img_size=64, window_size=4)
    schedule_args = dict(total_steps=50, warmup_steps=5, base_lr=1e-3, warmup_lr=1e-5, min_lr=1e-6, kind="cosine")

    def make():
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, 0.05, 0.8)]
        opt = torch.optim.AdamW(groups, lr=1e-3)
        return opt, StepSchedule(opt, **schedule_args)

    opt, sched = make()
    for _ in range(17):
        opt.step()
        sched.step()
    want = lr_at(17, **schedule_args)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(want * group["lr_scale"])
    opt2, sched2 = make()
    sched2.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
    assert min(g["lr_scale"] for g in opt.param_groups) == pytest.approx(0.8 ** (sum((2, 2, 2, 2)) + 1))


def test_deepspeed_config_is_derived_and_checked():
    cfg = load_config(PretrainConfig, None, ["data.batch_size=64", "deepspeed.global_batch=2048",
                                             "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                                             "deepspeed.offload_params=true", "optim.clip_grad=5.0"])
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 2048
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8 == 2048
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 5.0  # DeepSpeed 0.19 would silently clip at 1.0
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert not any(v == "auto" for v in _leaves(ds))
    from deepspeed.utils.config import get_timers_config  # DeepSpeed's own reading: no synchronising step timer

    assert not get_timers_config(ds).enabled
    with pytest.raises(ConfigError, match="not a multiple"):
        accumulation_steps(2048, 48, 8)
    lrs = scaled_lrs(cfg)
    assert lrs["base_lr"] == pytest.approx(1e-4 * 2048 / 512)
    assert math.isclose(lrs["warmup_lr"] / lrs["base_lr"], 5e-7 / 1e-4)


def test_offload_params_needs_zero3():
    with pytest.raises(ConfigError, match="zero_stage=3"):
        load_config(PretrainConfig, None, ["deepspeed.offload_params=true", "deepspeed.zero_stage=2"])


def _leaves(d):
    for v in d.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def test_slurm_env_maps_to_torch_distributed():
    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "MASTER_ADDR": "node01"}
    assert slurm_env(env) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_PORT": "29500"}
    assert slurm_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}  # one task: a plain single process
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        slurm_env({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})
