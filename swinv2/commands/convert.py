"""Convert checkpoints.

    python launch/convert.py runs/demo exported/          # newest checkpoint of a run -> exported/model.safetensors
                                                          # (+ exported/encoder.safetensors for SimMIM runs)
    python launch/convert.py runs/demo/checkpoints/step00000192 exported/
    python launch/convert.py runs/demo --universal        # DeepSpeed universal checkpoint: resume on another
                                                          # number of GPUs (a resumed run also does this itself)
    python launch/convert.py runs/finetune_demo exported/ --timm    # fine-tuned: + timm_model.safetensors
    python launch/convert.py runs/finetune_demo/best.safetensors exported/ --timm

``model.safetensors`` and ``encoder.safetensors`` load with ``swinv2.load_checkpoint`` /
``swinv2.create_model(name, checkpoint=...)``, adapted to the new model's resolution and window; a fine-tuning
run's ``model.json`` (the ``create_model`` arguments) is copied beside them. A weights file (``best.safetensors``,
the authors' or timm's ``.pth``) is rewritten in our layout. ``--timm`` also writes ``timm_model.safetensors`` and
``timm_config.json``: ``timm.create_model(model_name, **kwargs)`` then loads it with ``load_state_dict`` and gives
the same logits; the model is the run's ``model.json`` unless ``--model`` and the size options say otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..export import encoder_state_dict, export_timm, read_our_state
from ..files import save_safetensors
from ..finetune.weights import find_model_json, resolve_spec, write_model_json
from ..train.consolidate import to_universal
from . import FILE_ERRORS, run_command


def _convert(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, its checkpoints folder, one step* checkpoint folder, "
                                           "or a weights file")
    parser.add_argument("out", nargs="?", help="output folder for the safetensors files")
    parser.add_argument("--universal", action="store_true", help="write a DeepSpeed universal checkpoint instead")
    parser.add_argument("--timm", action="store_true", help="also write the weights in timm's layout")
    parser.add_argument("--model", help="swinv2.create_model name for --timm (default: the run's model.json)")
    parser.add_argument("--img-size", type=int, help="input size the model was trained at (--timm)")
    parser.add_argument("--window", type=int, help="window size (--timm)")
    parser.add_argument("--pretrained-windows", type=lambda s: [int(w) for w in s.split(",")],
                        help="per-stage pretrained windows, e.g. 12,12,12,6 (--timm)")
    parser.add_argument("--num-classes", type=int, help="classes of the head; 0 for a backbone (--timm)")
    args = parser.parse_args(argv)
    if args.universal:
        print(f"universal checkpoint: {to_universal(args.checkpoint)}")
        return 0
    if args.out is None:
        parser.error("give an output folder (or --universal)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} is an existing file: give a folder (it gets model.safetensors and "
                         "its companions)")
    state = read_our_state(args.checkpoint)
    print(f"model weights ({len(state)} tensors, fp32): {save_safetensors(state, out / 'model.safetensors')}")
    if any(k.startswith("encoder.") for k in state):
        encoder = encoder_state_dict(state)
        print(f"encoder for swinv2.load_checkpoint: {save_safetensors(encoder, out / 'encoder.safetensors')}")
    found = find_model_json(args.checkpoint)
    if found is not None:
        spec = json.loads(found.read_text())
        print(f"model for swinv2.create_model: {write_model_json(spec, out)} "
              f"(swinv2.create_model({spec['name']!r}, checkpoint=..., **options))")
    if args.timm:
        spec = resolve_spec(args.checkpoint, args.model, img_size=args.img_size, window_size=args.window,
                            pretrained_window_sizes=args.pretrained_windows, num_classes=args.num_classes)
        weights, config = export_timm(state, spec, out)
        print(f"timm weights: {weights}; timm.create_model arguments: {config}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``swinv2-convert`` / ``launch/convert.py``: the exit status (2 for a bad checkpoint or output path)."""
    return run_command(_convert, argv, user_errors=FILE_ERRORS)
