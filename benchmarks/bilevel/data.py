"""Data of the bilevel problems: offline stand-ins, and readers of the originals (local files).

Nothing is downloaded. With ``data_dir`` the originals are read from local files in their
published formats; without it a documented substitute is built:

* ijcnn1: libsvm files ``ijcnn1`` (train) and ``ijcnn1.t`` (BenchOpt's validation set), read
  by ``sklearn.datasets.load_svmlight_file`` and used unscaled as BenchOpt does; stand-in
  ``make_classification`` at ijcnn1's shape (49,990 train / 91,701 validation, ~9.7%
  positives, 21 standardised features and a constant one: 22; the model has no intercept,
  so without it the imbalanced stand-in is not learnable by a linear model).
* covtype: libsvm file ``covtype`` or ``covtype.scale`` (labels 1..7); stand-in
  ``load_digits`` (64 features, 10 classes).
* MNIST: idx files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (optionally ``.gz``); stand-in
  ``load_digits`` (1,000 train / 300 validation / 497 test).

Splits follow BenchOpt's dataset files (sizes, StandardScaler fitted on the training split).
A held-out half of the validation set is the test set where BenchOpt has none (ijcnn1).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from sklearn.datasets import (
    load_breast_cancer,
    load_digits,
    load_svmlight_file,
    make_classification,
)
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

Splits = dict[str, np.ndarray]
IJCNN1_SIZES = {"full": (49990, 91701), "quick": (5000, 5000), "tiny": (300, 300)}


def _find(data_dir: str | None, names: tuple[str, ...]) -> Path | None:
    if data_dir is None:
        return None
    for n in names:
        for cand in (Path(data_dir) / n, Path(data_dir) / (n + ".gz")):
            if cand.exists():
                return cand
    return None


def read_libsvm(path: str | Path, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A libsvm / svmlight file as a dense float64 matrix and its labels."""
    X, y = load_svmlight_file(str(path), n_features=n_features)
    return np.asarray(X.todense(), dtype=np.float64), np.asarray(y)


def read_idx(path: str | Path) -> np.ndarray:
    """An MNIST idx file (``.gz`` or not): uint8 images ``(n, rows * cols)`` or labels ``(n,)``."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = struct.unpack(">i", raw[:4])[0]
    if magic == 2049:
        (n,) = struct.unpack(">i", raw[4:8])
        return np.frombuffer(raw, np.uint8, count=n, offset=8).copy()
    if magic == 2051:
        n, rows, cols = struct.unpack(">iii", raw[4:16])
        return (
            np.frombuffer(raw, np.uint8, count=n * rows * cols, offset=16)
            .reshape(n, rows * cols)
            .copy()
        )
    raise ValueError(f"{path}: idx magic number {magic}, expected 2049 (labels) or 2051 (images)")


def _scale(splits: Splits) -> Splits:
    sc = StandardScaler().fit(splits["X_train"])
    return {k: (sc.transform(v) if k.startswith("X") else v) for k, v in splits.items()}


def _halve(X: np.ndarray, y: np.ndarray, rng) -> tuple:
    return train_test_split(X, y, test_size=0.5, random_state=rng)


def ijcnn1(
    data_dir: str | None = None, *, size: str = "full", seed: int = 2442
) -> tuple[Splits, str]:
    rng = np.random.RandomState(seed)
    train, test = _find(data_dir, ("ijcnn1",)), _find(data_dir, ("ijcnn1.t",))
    if train is not None and test is not None:
        Xtr, ytr = read_libsvm(train, 22)
        Xv, yv = read_libsvm(test, 22)
        Xva, Xte, yva, yte = _halve(Xv, yv, rng)
        splits = {"X_train": Xtr, "y_train": ytr, "X_val": Xva, "y_val": yva}
        return splits | {"X_test": Xte, "y_test": yte}, ""  # used as is (scaled to [-1, 1])
    n_tr, n_v = IJCNN1_SIZES[size]
    X, y = make_classification(
        n_samples=n_tr + n_v,
        n_features=21,
        n_informative=12,
        n_redundant=6,
        weights=[0.903],
        flip_y=0.02,
        class_sep=1.0,
        random_state=seed,
    )
    y = 2.0 * y - 1.0
    Xtr, ytr, Xv, yv = X[:n_tr], y[:n_tr], X[n_tr:], y[n_tr:]
    Xva, Xte, yva, yte = _halve(Xv, yv, rng)
    splits = _scale({"X_train": Xtr, "y_train": ytr, "X_val": Xva, "y_val": yva})
    splits |= _scale({"X_train": Xtr, "X_test": Xte, "y_test": yte})
    for k in ("X_train", "X_val", "X_test"):  # a constant 22nd feature: the model's intercept
        splits[k] = np.hstack([splits[k], np.ones((len(splits[k]), 1))])
    sub = (
        f"make_classification({n_tr} + {n_v}, 21 features + a constant one = ijcnn1's 22, "
        "9.7% positives) for ijcnn1"
    )
    return splits, sub


def breast_cancer(seed: int = 2442) -> Splits:
    """The real Wisconsin breast cancer data (569 x 30): 60% train, 20% validation, 20% test."""
    rng = np.random.RandomState(seed)
    X, y = load_breast_cancer(return_X_y=True)
    y = 2.0 * y - 1.0
    Xtr, Xr, ytr, yr = train_test_split(X, y, test_size=0.4, random_state=rng)
    Xva, Xte, yva, yte = _halve(Xr, yr, rng)
    return _scale(
        {"X_train": Xtr, "y_train": ytr, "X_val": Xva, "y_val": yva, "X_test": Xte, "y_test": yte}
    )


def covtype(
    data_dir: str | None = None, *, seed: int = 2442, max_samples: int | None = None
) -> tuple[Splits, str]:
    """BenchOpt's covtype splits: 20% test, then 20% of the rest for validation."""
    rng = np.random.RandomState(seed)
    path = _find(data_dir, ("covtype.scale", "covtype"))
    if path is not None:
        X, y = read_libsvm(path, 54)
        y = y.astype(np.int64) - 1
        sub = ""
    else:
        X, y = load_digits(return_X_y=True)
        sub = "load_digits (1,797 x 64, 10 classes) for covtype"
    if max_samples is not None:  # the smoke test's size
        X, y = X[:max_samples], y[:max_samples]
        sub += f" (first {max_samples} samples)"
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=rng)
    Xtr, Xva, ytr, yva = train_test_split(Xtr, ytr, test_size=0.2, random_state=rng)
    return _scale(
        {
            "X_train": Xtr,
            "y_train": ytr.astype(np.int64),
            "X_val": Xva,
            "y_val": yva.astype(np.int64),
            "X_test": Xte,
            "y_test": yte.astype(np.int64),
        }
    ), sub


def corrupt(y: np.ndarray, ratio: float, rng, n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """BenchOpt's corruption: with probability ``ratio`` a label is redrawn uniformly. Returns
    the new labels and the mask of labels that actually changed (the ground truth of the
    clean/corrupted AUROC: a redraw that hits the true class is clean)."""
    hit = rng.rand(len(y)) < ratio
    out = y.copy()
    out[hit] = rng.randint(0, n_classes, int(hit.sum()))
    return out, out != y


def cleaning(
    data_dir: str | None = None,
    *,
    seed: int = 32,
    ratio: float = 0.5,
    n_train: int = 1000,
    n_val: int = 300,
) -> tuple[Splits, str]:
    """BenchOpt's MNIST splits (20,000 train / 5,000 validation from the training set, the
    official test set), or digits (``n_train`` / ``n_val`` / the rest as test: 1,000 / 300 /
    497); labels corrupted with ``ratio``."""
    rng = np.random.RandomState(seed)
    paths = [
        _find(data_dir, (n,))
        for n in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    ]
    if all(p is not None for p in paths):
        Xall, yall = read_idx(paths[0]).astype(np.float64), read_idx(paths[1]).astype(np.int64)
        Xte, yte = read_idx(paths[2]).astype(np.float64), read_idx(paths[3]).astype(np.int64)
        n_train, n_val = min(20000, len(yall) * 4 // 5), min(5000, len(yall) // 5)
        Xtr, Xva, ytr, yva = train_test_split(
            Xall, yall, test_size=n_val, train_size=n_train, random_state=rng
        )
        sub = ""
    else:
        X, y = load_digits(return_X_y=True)
        Xtr, Xr, ytr, yr = train_test_split(X, y, train_size=n_train, random_state=rng)
        Xva, Xte, yva, yte = train_test_split(Xr, yr, train_size=n_val, random_state=rng)
        sub = f"load_digits ({n_train} train / {n_val} val / {len(yte)} test) for MNIST"
    ynoisy, changed = corrupt(ytr, ratio, rng)
    splits = {
        "X_train": Xtr,
        "y_train": ynoisy,
        "y_train_clean": ytr,
        "corrupted_mask": changed,
        "X_val": Xva,
        "y_val": yva,
        "X_test": Xte,
        "y_test": yte,
    }
    return _scale(splits), sub
