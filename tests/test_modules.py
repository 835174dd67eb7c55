"""Modules stay modules: every layer runs through its own forward (hooks fire, swapped submodules take effect),
LoRA and dynamic quantisation act on the model, importing the packages draws no random numbers, and the model
states its own optimizer facts."""

import copy
import math
import subprocess
import sys

import pytest
import torch
from conftest import TINY_V1, TINY_V2, randomize_
from torch import nn
from torch.nn.utils import prune

import simmim
import swinv2
from swinv2.attention import Float32Linear
from swinv2.model import SwinBlock
from swinv2.train.optim import layer_ids, no_weight_decay_params

SMALL = dict(img_size=64, window_size=4, num_classes=10)
MODELS = {"v2": ("swinv2_tiny_window8_256", TINY_V2), "v1": ("swin_tiny_patch4_window7_224", TINY_V1)}


def _model(version: str, **kw) -> nn.Module:
    name, arch = MODELS[version]
    return randomize_(swinv2.create_model(name, **{**arch, **SMALL, **kw}))


def _count_calls(model: nn.Module, forward) -> dict[str, int]:
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        def hook(_module, _args, _out, name=name):
            calls[name] = calls.get(name, 0) + 1
        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        forward()
    for h in handles:
        h.remove()
    return calls


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["plain", "cpu-kernels"])
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_layer_runs_its_forward_once(version, train, cpu_kernels):
    """Hand count for depths (2, 2, 2, 2): per block qkv, proj, fc1, fc2 (and V2's two CPB MLP layers); three
    patch mergings; the head. LayerNorms: two per block, three mergings, the patch embedding, the final norm."""
    model = _model(version, cpu_kernels=cpu_kernels).train(train)
    calls = _count_calls(model, lambda: model(torch.randn(2, 3, 64, 64)))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(linears) == 8 * (6 if version == "v2" else 4) + 3 + 1
    assert len(norms) == 8 * 2 + 3 + 1 + 1
    # every module fires exactly once, except the containers that are iterated rather than called
    want = {n: 1 for n, m in model.named_modules() if not isinstance(m, nn.ModuleList)}
    assert calls == want


def test_every_simmim_layer_runs_its_forward_once():
    encoder = swinv2.create_model("swinv2_tiny_window8_256", **{**TINY_V2, **SMALL, "num_classes": 0})
    model = randomize_(simmim.SimMIM(encoder, norm_target_patch_size=3))
    mask = torch.zeros(2, 16, 16)
    mask[:, ::2] = 1
    calls = _count_calls(model, lambda: model(torch.randn(2, 3, 64, 64), mask))
    # SimMIM runs the encoder stage by stage (the mask token goes in after the patch embedding), so the encoder
    # as a whole is not called; each of its layers is, once.
    skipped = ("encoder", "encoder.head")  # the head is an Identity that SimMIM never calls
    want = {n: 1 for n, m in model.named_modules() if not isinstance(m, nn.ModuleList) and n not in skipped}
    assert calls == want
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 8 * 6 + 3


def test_swapped_submodule_changes_the_output():
    model = _model("v2").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.layers[0].blocks[1].mlp.fc2 = nn.Linear(128, 32)
        nn.init.zeros_(model.layers[0].blocks[1].mlp.fc2.weight)
        nn.init.zeros_(model.layers[0].blocks[1].mlp.fc2.bias)
        # the block's MLP branch is now exactly zero: x + norm2(0) = x + norm2's bias
        after = model(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["plain", "cpu-kernels"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_lora_on_every_qkv_equals_the_merged_weights_in_float64(version, cpu_kernels):
    peft = pytest.importorskip("peft")
    model = _model(version, cpu_kernels=cpu_kernels).eval()
    reference, base = copy.deepcopy(model).double(), copy.deepcopy(model).double()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], init_lora_weights=False)
    lora = peft.inject_adapter_in_model(config, model)
    gen = torch.Generator().manual_seed(1)
    adapters = [m for m in lora.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(adapters) == 8
    with torch.no_grad():
        for adapter in adapters:
            for p in (adapter.lora_A["default"].weight, adapter.lora_B["default"].weight):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    # the independent re-computation: our float64 model with W + (alpha / r) B A in every qkv
    with torch.no_grad():
        for name, module in lora.named_modules():
            if isinstance(module, peft.tuners.lora.Linear):
                a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
                reference.get_submodule(name).weight += (8 / 4) * b @ a
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want, unadapted = lora(x), reference(x.double()), base(x.double())
    assert (want - unadapted).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["plain", "cpu-kernels"])
def test_pruning_every_linear_equals_zeroing_the_pruned_weights(cpu_kernels):
    """``torch.nn.utils.prune`` recomputes ``weight`` in a forward pre-hook: it takes effect only if the layer's
    own forward reads it."""
    model = _model("v2", cpu_kernels=cpu_kernels).eval()
    reference = copy.deepcopy(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in linears:
        prune.l1_unstructured(m, "weight", amount=0.5)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                reference.get_submodule(name).weight.mul_(m.weight_mask)
        x = torch.randn(2, 3, 64, 64)
        got, want = model(x), reference(x)
        assert not torch.allclose(got, _model("v2")(x), atol=1e-3)  # pruning half the weights matters
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao moves to torchao
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_dynamic_int8_quantisation_replaces_every_linear_and_stays_close(version):
    """Every nn.Linear is replaced; the CPB MLP's Float32Linear layers (V2) are not nn.Linear by type, so
    quantize_dynamic's exact-type match keeps them in float32, which is what they are for."""
    model = _model(version).eval()
    with torch.no_grad():  # the initial logit scale: randomize_'s 100x scale would magnify the int8 error of q.k
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(math.log(10.0))
    x = torch.randn(2, 3, 64, 64)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    cpb = sum(isinstance(m, Float32Linear) for m in model.modules())
    assert cpb == (2 * sum(len(stage.blocks) for stage in model.layers) if version == "v2" else 0)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, dynamic) for m in quantized.modules()) == linears
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    assert sum(isinstance(m, Float32Linear) for m in quantized.modules()) == cpb
    with torch.no_grad():
        want, got = model(x), quantized(x)
    assert not torch.equal(got, want)  # the int8 weights are really used
    # int8 weights (per-tensor scale) and activations through 36-52 layers: a few per cent of the logits' range
    assert float((got - want).abs().max()) < 0.06 * float(want.abs().max())
    assert float(nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)) > 0.999


def test_importing_the_packages_draws_no_random_numbers_and_does_no_tensor_work():
    code = (
        "import torch\n"
        "state = torch.random.get_rng_state()\n"
        "import swinv2, simmim, swinv2.train, swinv2.train.optim, swinv2.cpu_kernels\n"
        "assert torch.equal(state, torch.random.get_rng_state()), 'the RNG moved'\n"
        "for probe in (swinv2.cpu_kernels.private_softmax_ops_work, swinv2.cpu_kernels.onednn_linear_works):\n"
        "    assert probe.cache_info().currsize == 0, 'a feature probe ran at import'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_model_states_its_optimizer_facts(version):
    """``no_weight_decay`` and ``layer_ids`` by name, against rules written out here from the names; the
    trainer's id-based sets are exactly these."""
    model = _model(version, ape=True)
    by_name = dict(model.named_parameters())
    exempt = {n for n, p in by_name.items()
              if p.ndim == 1 or n.endswith(("logit_scale", "relative_position_bias_table")) or ".cpb_mlp." in n
              or n == "absolute_pos_embed"}
    assert model.no_weight_decay() == exempt
    assert no_weight_decay_params(model) == {id(by_name[n]) for n in exempt}
    ids = model.layer_ids()
    assert ids["patch_embed.proj.weight"] == 0 and ids["absolute_pos_embed"] == 0
    assert ids["layers.1.blocks.1.attn.qkv.weight"] == 2 + 1 + 1
    assert ids["layers.1.downsample.reduction.weight"] == 4
    assert ids["head.weight"] == ids["norm.weight"] == model.num_layers - 1 == 9
    assert layer_ids(model) == {id(by_name[n]): layer for n, layer in ids.items()}


def test_simmim_adds_its_mask_token_to_the_optimizer_facts():
    encoder = swinv2.create_model("swinv2_tiny_window8_256", **{**TINY_V2, **SMALL, "num_classes": 0})
    model = simmim.SimMIM(encoder)
    assert model.no_weight_decay() == {"mask_token", "decoder.0.bias"} | {
        f"encoder.{n}" for n in encoder.no_weight_decay()}
    ids = model.layer_ids()
    assert ids["mask_token"] == 0 and ids["decoder.0.weight"] == encoder.num_layers - 1
    assert {n: v for n, v in ids.items() if n.startswith("encoder.")} == {
        f"encoder.{n}": v for n, v in encoder.layer_ids().items()}


def test_optimizer_facts_of_a_model_without_them_are_one_clear_error():
    with pytest.raises(ValueError, match="no_weight_decay"):
        no_weight_decay_params(nn.Linear(2, 2))


def test_blocks_hold_no_mask_or_index_buffers():
    """Every buffer a block held per stage (the (nW, N, N) shift mask, the int64 (N, N) index) is gone: 1.9 GiB per
    rank at SwinV2-G 1536/w32, never partitioned by ZeRO-3. Only the CPB's small coordinate table is left."""
    block = SwinBlock("v2", 16, 2, (4, 4), (2, 2))
    assert [name for name, _ in block.named_buffers()] == ["attn.relative_coords_table"]
    assert not list(SwinBlock("v1", 16, 2, (4, 4), (2, 2)).named_buffers())
