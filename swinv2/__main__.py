"""``python -m swinv2 [NAME] [key=value ...]``: list the models, or show one model's geometry and size."""

from __future__ import annotations

import ast
import sys

import torch

from . import create_model, list_models


def main(argv: list[str]) -> int:
    if not argv:
        print("\n".join(list_models()))
        return 0
    name, overrides = argv[0], {}
    for item in argv[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"option {item!r} is not key=value: write e.g. img_size=384", file=sys.stderr)
            return 2
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    try:
        with torch.device("meta"):  # geometry and size only: no memory, no init cost
            model = create_model(name, **overrides)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: Swin {model.version.upper()}, {params / 1e6:.2f}M parameters, input {model.img_size}")
    for i, stage in enumerate(model.layers):
        first = stage.blocks[0]
        shifts = sorted({b.shift for b in stage.blocks})
        pretrained = getattr(first.attn, "pretrained_window", None)
        print(
            f"  stage {i}: {len(stage.blocks)} blocks, dim {first.norm1.normalized_shape[0]}, "
            f"heads {first.attn.num_heads}, window {first.window}, shifts {shifts}"
            + (f", pretrained window {pretrained}" if pretrained else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
