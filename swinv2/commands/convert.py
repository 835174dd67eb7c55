"""Convert checkpoints.

    python launch/convert.py runs/demo exported/          # newest checkpoint of a run -> exported/model.safetensors
                                                          # (+ exported/encoder.safetensors for SimMIM runs)
    python launch/convert.py runs/demo/checkpoints/step00000192 exported/
    python launch/convert.py runs/demo --universal        # DeepSpeed universal checkpoint: resume on another
                                                          # number of GPUs (a resumed run also does this itself)
    python launch/convert.py runs/finetune_demo exported/ --timm    # fine-tuned: + timm_model.safetensors
    python launch/convert.py runs/finetune_demo/best.safetensors exported/ --timm
    python launch/convert.py runs/finetune_demo exported_hf/ --hf     # a transformers checkpoint directory
    python launch/convert.py runs/demo exported_hf/ --hf              # SimMIM: masked-image model + backbone/
    python launch/convert.py hf_dir/ exported/                         # a transformers directory -> ours

``model.safetensors`` and ``encoder.safetensors`` load with ``swinv2.load_checkpoint`` /
``swinv2.create_model(name, checkpoint=...)``, adapted to the new model's resolution and window; a fine-tuning
run's ``model.json`` (the ``create_model`` arguments) is copied beside them. A weights file (``best.safetensors``,
the authors' or timm's ``.pth``) is rewritten in our layout. ``--timm`` also writes ``timm_model.safetensors`` and
``timm_config.json``: ``timm.create_model(model_name, **kwargs)`` then loads it with ``load_state_dict`` and gives
the same logits; the model is the run's ``model.json`` unless ``--model`` and the size options say otherwise.

``--hf`` writes a Hugging Face transformers checkpoint directory instead of our files (``config.json``,
``model.safetensors``, ``preprocessor_config.json``): ``AutoModelForImageClassification.from_pretrained(OUT)`` for a
fine-tuned run (labelled with the class names of its data set's ``dataset.json``), ``AutoModel`` for a backbone
(``--num-classes 0``), ``Swin(v2)ForMaskedImageModeling`` for a SimMIM run (whose backbone also goes to
``OUT/backbone``); ``AutoImageProcessor.from_pretrained(OUT)`` gives the evaluation transform. A SimMIM run without
``model.json`` is described by its ``config.yaml``. A model transformers cannot express (e.g. SwinV2-H/G's extra
norms) stops with one sentence and exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..export import (
    dataset_classes,
    encoder_state_dict,
    export_timm,
    export_transformers,
    find_run_config,
    read_our_state,
    run_spec,
)
from ..files import save_safetensors
from ..finetune.weights import find_model_json, resolve_spec, write_model_json
from ..hf_layout import read_config, spec_from_config
from ..train.consolidate import to_universal
from . import FILE_ERRORS, run_command


def _convert(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, its checkpoints folder, one step* checkpoint folder, "
                                           "or a weights file")
    parser.add_argument("out", nargs="?", help="output folder for the safetensors files")
    parser.add_argument("--universal", action="store_true", help="write a DeepSpeed universal checkpoint instead")
    parser.add_argument("--timm", action="store_true", help="also write the weights in timm's layout")
    parser.add_argument("--hf", action="store_true",
                        help="write a Hugging Face transformers checkpoint directory instead of our files")
    parser.add_argument("--model", help="swinv2.create_model name for --timm/--hf (default: the run's model.json)")
    parser.add_argument("--img-size", type=int, help="input size the model was trained at (--timm/--hf)")
    parser.add_argument("--window", type=int, help="window size (--timm/--hf)")
    parser.add_argument("--pretrained-windows", type=lambda s: [int(w) for w in s.split(",")],
                        help="per-stage pretrained windows, e.g. 12,12,12,6 (--timm/--hf)")
    parser.add_argument("--num-classes", type=int, help="classes of the head; 0 for a backbone (--timm/--hf)")
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
    if out.resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"the output folder {str(out)!r} is the checkpoint itself: give another folder")
    sizes = dict(img_size=args.img_size, window_size=args.window, pretrained_window_sizes=args.pretrained_windows,
                 num_classes=args.num_classes)
    state = read_our_state(args.checkpoint)
    if args.hf:  # transformers' names: its model.safetensors replaces ours in this folder
        spec = run_spec(args.checkpoint, args.model, **sizes)
        run = find_run_config(args.checkpoint) or {}
        files = export_transformers(state, spec, out, labels=dataset_classes(args.checkpoint), data=run.get("data"))
        print(f"transformers checkpoint ({spec['name']} {json.dumps(spec['options'])}): "
              f"{', '.join(str(f) for f in files)}")
        if any(k.startswith("encoder.") for k in state) and (run.get("simmim") or {}).get("norm_target_patch_size"):
            print("note: the run learned the locally normalised target; transformers' masked-image-modelling loss "
                  "compares the reconstruction with the raw pixels, so its loss is not the run's")
    else:
        print(f"model weights ({len(state)} tensors, fp32): {save_safetensors(state, out / 'model.safetensors')}")
        if any(k.startswith("encoder.") for k in state):
            encoder = encoder_state_dict(state)
            print(f"encoder for swinv2.load_checkpoint: {save_safetensors(encoder, out / 'encoder.safetensors')}")
        found = find_model_json(args.checkpoint)
        hf_config = read_config(args.checkpoint)
        if found is not None or hf_config is not None:
            spec = spec_from_config(hf_config) if hf_config is not None else json.loads(found.read_text())
            print(f"model for swinv2.create_model: {write_model_json(spec, out)} "
                  f"(swinv2.create_model({spec['name']!r}, checkpoint=..., **options))")
    if args.timm:
        spec = resolve_spec(args.checkpoint, args.model, **sizes)
        weights, config = export_timm(state, spec, out)
        print(f"timm weights: {weights}; timm.create_model arguments: {config}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``swinv2-convert`` / ``launch/convert.py``: the exit status (2 for a bad checkpoint or output path)."""
    return run_command(_convert, argv, user_errors=FILE_ERRORS)
