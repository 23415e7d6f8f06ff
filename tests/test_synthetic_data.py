"""Synthetic task data: the MNIST idx reader on tiny files in the real format, digits, splits."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from tasks.synthetic import data as D


def _write_idx(path, array: np.ndarray, magic: int, gz: bool = False) -> None:
    head = struct.pack(">i", magic) + struct.pack(">" + "i" * array.ndim, *array.shape)
    raw = head + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def _fixture(tmp_path, n=5, side=6, gz=False, prefix="train"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, 2051, gz)
    _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 2049, gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_round_trip(tmp_path, gz):
    images, labels = _fixture(tmp_path, gz=gz)
    ds = D.load_mnist(tmp_path, "train", side=6)
    assert ds.x.shape == (5, 1, 6, 6) and ds.x.dtype == torch.float32
    np.testing.assert_allclose(ds.x[:, 0].numpy(), images / 255.0, rtol=0, atol=1e-7)
    assert ds.y.tolist() == labels.tolist()
    padded = D.load_mnist(tmp_path, "train", side=10)  # zero border for rotations
    assert padded.x.shape == (5, 1, 10, 10)
    assert torch.equal(padded.x[:, :, 2:8, 2:8], ds.x) and padded.x[:, :, :2].abs().sum() == 0


def test_idx_reader_magic_numbers_and_big_endian(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a", arr, 2051)
    assert (tmp_path / "a").read_bytes()[:4] == b"\x00\x00\x08\x03"
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a", D.IDX_IMAGES_MAGIC), arr)


def test_idx_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope-idx3-ubyte"
    with pytest.raises(FileNotFoundError, match="nope-idx3-ubyte"):
        D.read_idx(missing)
    arr = np.zeros((2, 3, 3), dtype=np.uint8)
    _write_idx(tmp_path / "labels-as-images", arr, 2049 + 2)  # 3-dim file, label magic expected
    with pytest.raises(ValueError, match="labels-as-images.*magic"):
        D.read_idx(tmp_path / "labels-as-images", D.IDX_LABELS_MAGIC)
    _write_idx(tmp_path / "short", arr, 2051)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="short.*declares"):
        D.read_idx(tmp_path / "short")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="tiny.*too short"):
        D.read_idx(tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        D.load_mnist(tmp_path / "empty")


def test_mismatched_image_and_label_counts(tmp_path):
    _fixture(tmp_path, n=4)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8), 2049)
    with pytest.raises(ValueError, match="do not match"):
        D.load_mnist(tmp_path)


def test_digits_and_disjoint_splits():
    ds = D.load_digits(scale=2)
    assert ds.x.shape == (1797, 1, 24, 24) and float(ds.x.max()) <= 1.0
    assert D.load_digits().x.shape[-1] == 12
    sp = D.split(ds, 100, 200, 300, seed=0)
    assert (len(sp.ft_train), len(sp.ft_val), len(sp.test), len(sp.pt)) == (100, 200, 300, 1197)
    # disjoint by index: the label multiset of the four parts is that of the whole set
    ys = torch.cat([d.y for d in (sp.pt, sp.ft_train, sp.ft_val, sp.test)])
    assert torch.equal(ys.bincount(), ds.y.bincount())
    assert torch.equal(D.split(ds, 100, 200, 300, seed=0).ft_val.x, sp.ft_val.x)  # seeded
    with pytest.raises(ValueError, match="need"):
        D.split(ds, 1000, 1000, 0, seed=0)
