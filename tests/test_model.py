"""Model-level behaviour: API, parameter counts, init, checkpointing, extra norm, sizes and errors."""

import pytest
import torch
from conftest import TINY_V2, randomize_

import swinv2

# The Swin V2 paper's table (arXiv 2111.09883, 1k head), millions of parameters; H and G: its approximate sizes.
PARAM_COUNTS = {
    "swinv2_tiny_window8_256": (28.35, 0.005),
    "swinv2_small_window8_256": (49.73, 0.005),
    "swinv2_base_window8_256": (87.92, 0.005),
    "swinv2_large_window12to16_192to256": (196.74, 0.005),
    "swinv2_huge_window12_192": (658.0, 0.01 * 658),
    "swinv2_giant_window12_192": (3000.0, 0.03 * 3000),
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts_match_published(name):
    with torch.device("meta"):
        model = swinv2.create_model(name, num_classes=1000)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    want, tol = PARAM_COUNTS[name]
    assert abs(millions - want) <= tol, f"{name}: {millions:.3f}M parameters, published {want}M"


def test_every_listed_name_builds():
    names = swinv2.list_models()
    assert names == sorted(names) and len(names) == 23
    for name in names:
        with torch.device("meta"):
            model = swinv2.create_model(name)
        assert model.version == ("v2" if name.startswith("swinv2") else "v1")


def test_finetune_variants_carry_pretrained_windows():
    model = swinv2.create_model("swinv2_base_window12to24_192to384", depths=(1, 1, 1, 1), embed_dim=32)
    assert model.stage_windows == [(24, 24), (24, 24), (24, 24), (12, 12)]
    assert [s.blocks[0].attn.pretrained_window for s in model.layers] == [(12, 12), (12, 12), (12, 12), (6, 6)]


def test_v2_init_blocks_start_as_identity():
    model = swinv2.create_model("swinv2_tiny_window8_256", img_size=64, **TINY_V2).eval()
    x = torch.randn(1, 16, 16, 32)
    block = model.layers[0].blocks[1]
    with torch.no_grad():
        assert torch.equal(block(x), x)  # zero-initialised post-norms: x + 0 + 0
    assert torch.allclose(block.attn.logit_scale, torch.log(torch.tensor(10.0)))
    assert block.attn.q_bias.abs().sum() == 0 and block.attn.qkv.bias is None


def test_forward_shapes_and_stage_outputs_non_square():
    model = swinv2.create_model("swinv2_tiny_window8_256", img_size=(192, 256), num_classes=7, **TINY_V2).eval()
    x = torch.randn(2, 3, 192, 256)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.forward_features(x).shape == (2, 6, 8, 256)
        stages = model.forward_stages(x)
    assert [tuple(s.shape) for s in stages] == [(2, 32, 48, 64), (2, 64, 24, 32), (2, 128, 12, 16), (2, 256, 6, 8)]
    headless = swinv2.create_model("swinv2_tiny_window8_256", num_classes=0, img_size=64, **TINY_V2)
    assert isinstance(headless.head, torch.nn.Identity)


def test_other_input_sizes_run_padded():
    # built for 256, fed 224x320: stage maps 56x80 etc. are padded to window multiples
    model = randomize_(swinv2.create_model("swinv2_tiny_window8_256", **TINY_V2)).eval()
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 224, 320))
    assert out.shape == (1, 7, 10, 256) and torch.isfinite(out).all()


def test_bad_image_size_gets_one_clear_sentence():
    model = swinv2.create_model("swinv2_tiny_window8_256", img_size=64, **TINY_V2)
    with pytest.raises(ValueError, match=r"image size 66x64 is not a multiple of the patch size 4"):
        model(torch.randn(1, 3, 66, 64))
    with pytest.raises(ValueError, match=r"with 3 channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"unknown model 'swinv2_tiny_window7_224'"):
        swinv2.create_model("swinv2_tiny_window7_224")
    with pytest.raises(ValueError, match=r"window_size has 3 entries"):
        swinv2.create_model("swinv2_tiny_window8_256", window_size=[8, 8, 8])
    with pytest.raises(ValueError, match=r"unknown option 'widow_size'"):
        swinv2.create_model("swinv2_tiny_window8_256", widow_size=8)


def test_drop_path_schedule_is_linear_over_blocks():
    model = swinv2.create_model("swinv2_tiny_window8_256", img_size=64, **{**TINY_V2, "drop_path_rate": 0.3})
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for s in model.layers for b in s.blocks]
    assert rates == pytest.approx([0.3 * i / 7 for i in range(8)])


def test_activation_checkpointing_gives_identical_outputs_and_gradients():
    def run(checkpointed):
        torch.manual_seed(0)
        model = swinv2.create_model("swinv2_tiny_window8_256", img_size=64, **{**TINY_V2, "drop_path_rate": 0.2})
        randomize_(model).train()
        model.set_checkpoint_activations(checkpointed)
        torch.manual_seed(1)  # same drop-path draws; checkpoint replays the RNG state on recompute
        loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2]))
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = run(False), run(True)
    torch.testing.assert_close(plain[0], checkpointed[0], rtol=0, atol=0)
    for name, grad in plain[1].items():
        torch.testing.assert_close(grad, checkpointed[1][name], rtol=1e-6, atol=1e-7, msg=name)


def test_chunked_attention_model_level():
    x = torch.randn(1, 3, 64, 64)
    base = randomize_(swinv2.create_model("swinv2_tiny_window8_256", img_size=64, **TINY_V2)).eval()
    chunked = swinv2.create_model("swinv2_tiny_window8_256", img_size=64, attn_chunk_size=1, **TINY_V2).eval()
    chunked.load_state_dict(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(base(x), chunked(x), rtol=1e-6, atol=1e-6)


def test_extra_norm_every_k_blocks():
    cfg = {**TINY_V2, "depths": (2, 2, 4, 2)}
    model = swinv2.create_model("swinv2_tiny_window8_256", img_size=64, extra_norm_every=2, **cfg)
    flags = [[b.extra_norm is not None for b in s.blocks] for s in model.layers]
    assert flags == [[False, True], [False, True], [False, True, False, True], [False, True]]
    block = randomize_(model).layers[2].blocks[1]
    x = torch.randn(1, 4, 4, 128)
    with torch.no_grad():
        with_norm = block(x)
        norm, block.extra_norm = block.extra_norm, None
        torch.testing.assert_close(with_norm, norm(block(x)))
    giant = swinv2.create_model("swinv2_giant_window12_192", depths=(1, 1, 12, 1), embed_dim=32)
    assert [j for j, b in enumerate(giant.layers[2].blocks) if b.extra_norm is not None] == [5, 11]


def test_derived_buffers_never_in_state_dict():
    model = swinv2.create_model("swinv2_tiny_window8_256", img_size=64, **TINY_V2)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert not [k for k in model.state_dict() if any(b in k for b in ("index", "coords_table", "mask"))]


def test_hooked_outputs_are_not_overwritten_by_the_residual():
    model = randomize_(swinv2.create_model("swinv2_tiny_window8_256", img_size=64, **TINY_V2)).eval()
    block = model.layers[0].blocks[0]
    seen = []
    handle = block.norm2.register_forward_hook(lambda module, args, out: seen.append((out, out.clone())))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    handle.remove()
    (kept, copy), = seen
    assert torch.equal(kept, copy)  # what the hook kept is still the norm's output, not the residual sum


def test_v2_with_bf16_parameters_and_float32_buffers_trains_like_deepspeed_casts_it():
    # DeepSpeed's bf16 engine casts parameters, not buffers: the float32 coordinate table meets a bf16 CPB MLP.
    model = randomize_(swinv2.create_model("swinv2_tiny_window8_256", img_size=64, **TINY_V2))
    reference = {name: p.detach().to(torch.bfloat16).double() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    attn = model.layers[0].blocks[0].attn
    assert attn.relative_coords_table.dtype == torch.float32
    loss = model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)).float().square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.dtype == torch.bfloat16
                                        for p in model.parameters() if p.requires_grad)
    # The bias is the CPB MLP of the bf16 weights, to bf16 precision (float64 recomputation of the MLP).
    prefix = "layers.0.blocks.0.attn.cpb_mlp"
    coords = attn.relative_coords_table.double()
    hidden = torch.relu(coords @ reference[f"{prefix}.0.weight"].T + reference[f"{prefix}.0.bias"])
    table = hidden @ reference[f"{prefix}.2.weight"].T
    expected = 16 * torch.sigmoid(attn.gather_bias(table))
    got = attn.position_bias()
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=0.1)
