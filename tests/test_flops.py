"""Model FLOPs (swinv2.flops) against the hand count of the Swin paper (arXiv 2103.14030 sec. 3.2 eq. 1-2).

Per block on an h x w map of C channels with window M (multiply-adds): qkv and output projection 4hwC^2 and the
two attention products 2M^2hwC on the map padded to window multiples, the MLP 8hwC^2 on the map itself; patch
merging (h/2)(w/2) 4C 2C; plus the patch embedding, the head or SimMIM's decoder, and V2's position-bias MLP
(Linear(2, 512) and Linear(512, heads) on (2M-1)^2 relative coordinates, once per forward). FLOPs = 2 x MACs.
"""

from __future__ import annotations

import math

import pytest
import torch

import simmim
import swinv2
from swinv2.flops import image_flops


def hand_count(version, img, embed_dim, depths, heads, window, num_classes=0, decoder=False):
    """(per-image FLOPs, fixed FLOPs per forward) of a Swin model, counted by hand."""
    per_image, fixed = 0, 0
    size, dim = img // 4, embed_dim
    per_image += size * size * dim * 3 * 4 * 4  # patch embedding: a 4x4 conv from 3 channels
    for i, depth in enumerate(depths):
        w = min(size, window)  # a window larger than the map is clipped to it
        padded = math.ceil(size / w) * w
        block = 4 * padded**2 * dim**2 + 2 * w * w * padded**2 * dim + 8 * size**2 * dim**2
        per_image += depth * block
        if version == "v2":
            fixed += depth * (2 * w - 1) ** 2 * (2 * 512 + 512 * heads[i])
        if i < len(depths) - 1:
            half = math.ceil(size / 2)
            per_image += half * half * 4 * dim * 2 * dim
            size, dim = half, 2 * dim
    if num_classes:
        per_image += dim * num_classes
    if decoder:
        per_image += size * size * dim * 32 * 32 * 3  # 1x1 conv to 32^2 * 3 channels at stride 32
    return 2 * per_image, 2 * fixed


SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))


@pytest.mark.parametrize(
    "name, options, img, window",
    [
        ("swinv2_tiny_window8_256", {}, 256, 8),  # the published SwinV2-T
        ("swinv2_tiny_window8_256", dict(SMALL, img_size=224, window_size=12), 224, 12),  # padded maps: 56 -> 60
        ("swin_tiny_patch4_window7_224", {}, 224, 7),  # V1: no position-bias MLP
    ],
)
def test_classifier_flops_equal_the_hand_count(name, options, img, window):
    def make():
        return swinv2.create_model(name, **options)

    with torch.device("meta"):
        reference = make()
    flops = image_flops(make, lambda m, b: m(torch.empty(b, 3, img, img)))
    per_image, fixed = hand_count(reference.version, img, reference.embed_dim, reference.depths,
                                  [s.blocks[0].attn.num_heads for s in reference.layers], window,
                                  num_classes=reference.num_classes)
    assert (flops.per_image, flops.fixed) == (per_image, fixed)
    assert flops.forward(3) == 3 * per_image + fixed


def test_simmim_flops_include_the_decoder_and_the_recomputed_blocks():
    def make():
        encoder = swinv2.create_model("swinv2_tiny_window8_256", num_classes=0, img_size=192, window_size=12,
                                      **SMALL)
        return simmim.SimMIM(encoder, norm_target_patch_size=47)

    flops = image_flops(make, lambda m, b: m(torch.empty(b, 3, 192, 192), torch.zeros(b, 48, 48, dtype=torch.long)))
    per_image, fixed = hand_count("v2", 192, 32, (2, 2, 2, 2), (2, 4, 8, 16), 12, decoder=True)
    assert (flops.per_image, flops.fixed) == (per_image, fixed)
    # What activation checkpointing reruns: the blocks, i.e. everything but the embedding, merging and decoder.
    outside = 2 * (48 * 48 * 32 * 48 + sum((48 >> (i + 1)) ** 2 * 4 * (32 << i) * 2 * (32 << i) for i in range(3))
                   + 6 * 6 * 256 * 32 * 32 * 3)
    assert flops.block_per_image == per_image - outside
    assert flops.block_fixed == fixed
