"""What a practitioner tries first on a small labelled set: k-nearest neighbours and logistic regression, on raw
pixels and on the frozen pooled features of a (pretrained) encoder, the real-image benchmark's reference points.

    python benchmarks/baselines.py runs/real/mnist5k                         # raw pixels
    python benchmarks/baselines.py runs/real/mnist5k --encoder runs/real/pretrain_s0 --img-size 32

Reads ``DATA/images/<split>/<class>/*.png`` (``benchmarks/real_data.py``), fits on each ``labelled_<n>`` split
and on ``train`` and scores top-1 on ``test``. kNN: cosine similarity, k in {1, 5, 10, 20} and logistic
regression: C in {0.01, 0.1, 1, 10} on standardised features, each with the best value on ``test`` reported (an
optimistic choice, so the baselines are never weakened; kNN also tries raw and standardised features).
``--encoder`` takes a pretraining run (or any checkpoint ``swinv2.create_model`` loads) and uses its encoder's
pooled features (a linear probe, as MAE arXiv 2111.06377 sec. 4.3 and SimMIM arXiv 2111.09886 report one), the
images resized to ``--img-size`` and normalised as fine-tuning does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KS = (1, 5, 10, 20)
CS = (0.01, 0.1, 1.0, 10.0)


def read_split(folder: Path) -> tuple[list[Image.Image], np.ndarray]:
    """The images of ``folder/<class>/*.png`` (decoded by PIL) and their labels (sorted class names)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.png")):
            images.append(Image.open(path).convert("L"))
            labels.append(label)
    return images, np.array(labels)


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32).ravel() / 255 for im in images])


def encoder_features(images: list[Image.Image], checkpoint: str, img_size: int, random_init: bool = False
                     ) -> np.ndarray:
    """Pooled features of the checkpoint's encoder (eval mode, no head) on the images resized to ``img_size``;
    ``random_init``: the same architecture with its initial weights (seed 0), the reference a probe must beat."""
    import torch

    import swinv2
    from swinv2.export import run_spec
    from swinv2.finetune.weights import create_from_spec, load_pretrained

    spec = run_spec(checkpoint)  # a pretraining run: its config.yaml's model section
    spec["options"].update(img_size=img_size, num_classes=0)
    torch.manual_seed(0)
    model = create_from_spec(spec)
    if not random_init:
        load_pretrained(model, checkpoint)
    model.eval()
    mean = torch.tensor(swinv2.data.config.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(swinv2.data.config.IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            batch = [np.asarray(im.convert("RGB").resize((img_size, img_size), Image.BICUBIC)) for im in
                     images[i:i + 256]]
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255
            out.append(model((x - mean) / std).numpy())  # num_classes=0: the pooled features
    return np.concatenate(out)


def scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> dict[str, float]:
    """Best kNN and logistic-regression top-1 (percent) over the small grids, with the value that won."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    tr, te = scaler.transform(train_x), scaler.transform(test_x)
    knn = {(k, scaled): 100 * KNeighborsClassifier(min(k, len(a)), metric="cosine").fit(a, train_y).score(b, test_y)
           for k in KS for scaled, a, b in ((False, train_x, test_x), (True, tr, te))}
    logreg = {c: 100 * LogisticRegression(C=c, max_iter=2000).fit(tr, train_y).score(te, test_y) for c in CS}
    k, c = max(knn, key=knn.get), max(logreg, key=logreg.get)
    return {"knn": knn[k], "knn_k": k[0], "knn_standardised": k[1], "logreg": logreg[c], "logreg_C": c}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--encoder", default=None, help="a pretraining run or checkpoint: frozen features")
    parser.add_argument("--random-init", action="store_true", help="the encoder's architecture, initial weights")
    parser.add_argument("--img-size", type=int, default=32)
    args = parser.parse_args(argv)
    root = Path(args.data) / "images"
    test_images, test_y = read_split(root / "test")
    featurise = pixels if args.encoder is None else (
        lambda ims: encoder_features(ims, args.encoder, args.img_size, args.random_init))
    test_x = featurise(test_images)
    results = {}
    for split in sorted((p.name for p in root.iterdir() if p.name != "test"), key=lambda s: (len(s), s)):
        images, y = read_split(root / split)
        results[split] = scores(featurise(images), y, test_x, test_y)
        print(f"{split:>13} ({len(y)} labels): kNN {results[split]['knn']:.1f} (k={results[split]['knn_k']}), "
              f"logistic regression {results[split]['logreg']:.1f} (C={results[split]['logreg_C']:g})", flush=True)
    features = "pixels" if args.encoder is None else ("initial weights of " if args.random_init else "") + args.encoder
    print(json.dumps({"features": features, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
