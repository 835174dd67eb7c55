"""The named architectures as plain data, spelled as in timm (sizes from arXiv 2103.14030 table 1 and
arXiv 2111.09883 sec. 4.1; H and G use head dim 32 and the extra norm every 6 blocks, sec. 3.1)."""

from __future__ import annotations

SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_every=6),
    "giant": dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128), extra_norm_every=6),
}

# Fine-tunes from 192/w12 keep the pretraining window per stage; stage 4 was 6x6 at 192 px.
FROM_192 = (12, 12, 12, 6)


def _v2(size: str, img: int, window: int, pretrained=0) -> dict:
    return dict(version="v2", img_size=img, window_size=window, pretrained_window_sizes=pretrained, **SIZES[size])


def _v1(size: str, img: int, window: int) -> dict:
    cfg = {k: v for k, v in SIZES[size].items() if k != "extra_norm_every"}
    return dict(version="v1", img_size=img, window_size=window, **cfg)


VARIANTS: dict[str, dict] = {
    **{f"swinv2_{s}_window{w}_256": _v2(s, 256, w) for s in ("tiny", "small", "base") for w in (8, 16)},
    **{f"swinv2_{s}_window12_192": _v2(s, 192, 12) for s in ("tiny", "small", "huge", "giant")},
    # The authors' (and timm's) 192 px base/large models are ImageNet-22K classifiers.
    **{f"swinv2_{s}_window12_192": dict(_v2(s, 192, 12), num_classes=21841) for s in ("base", "large")},
    **{f"swinv2_{s}_window12to16_192to256": _v2(s, 256, 16, FROM_192) for s in ("base", "large")},
    **{f"swinv2_{s}_window12to24_192to384": _v2(s, 384, 24, FROM_192) for s in ("base", "large")},
    **{f"swin_{s}_patch4_window7_224": _v1(s, 224, 7) for s in ("tiny", "small", "base", "large")},
    **{f"swin_{s}_patch4_window12_384": _v1(s, 384, 12) for s in ("base", "large")},
    "swin_base_patch4_window6_192": _v1("base", 192, 6),
}
