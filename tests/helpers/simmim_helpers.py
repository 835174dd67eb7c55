"""Shared by the SimMIM tests: a CPU-sized encoder config, a randomised SimMIM model and seeded masks."""

import pytest
import torch
from conftest import randomize_

import swinv2
from simmim import MaskGenerator, SimMIM

V2, V1 = "swinv2_tiny_window8_256", "swin_tiny_patch4_window7_224"
TINY = dict(
    img_size=64, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), num_classes=0,
    drop_path_rate=0.0,
)  # fmt: skip


def tiny_simmim(name: str = V2, norm_target: int | None = None, **kw) -> SimMIM:
    encoder = swinv2.create_model(name, **{**TINY, **kw})
    return randomize_(SimMIM(encoder, norm_target_patch_size=norm_target)).eval()


def masks(size, batch: int, seed: int = 0) -> torch.Tensor:
    """``batch`` seeded masks (16 px mask patches, ratio 0.6), stacked as SimMIM takes them."""
    gen = MaskGenerator(size, mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)
    return torch.stack([gen(seed=seed + i) for i in range(batch)])


@pytest.fixture
def one_thread():
    """Models this small run fastest on one thread, and do not stall on thread barriers when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
