"""Data for the synthetic experiments: scikit-learn's bundled digits (default) or MNIST idx files.

Images come back as float tensors in [0, 1] of shape ``(n, 1, side, side)`` with integer labels.
Both sources are zero-padded so that a rotation by any angle keeps the whole digit inside the
frame (the corners of a square reach ``side * sqrt(2) / 2`` from the centre): digits 8x8 ->
12x12, MNIST 28x28 (already with a blank border) stays 28x28 unless asked.

Splits (:func:`split`) are disjoint and stratified-free random permutations drawn from a seeded
generator: PT (pre-training), FT-train, FT-val (together D_FT(Meta) of Algorithm 1), test.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Dataset", "Splits", "gaussian_blur", "load_digits", "read_idx", "load_mnist", "load",
           "split"]

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension


@dataclass
class Dataset:
    x: torch.Tensor  # (n, 1, side, side), float in [0, 1]
    y: torch.Tensor  # (n,), int64 class labels 0..9

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: torch.Tensor) -> Dataset:
        return Dataset(self.x[idx], self.y[idx])


@dataclass
class Splits:
    pt: Dataset
    ft_train: Dataset
    ft_val: Dataset
    test: Dataset


def _pad(x: torch.Tensor, side: int) -> torch.Tensor:
    extra = side - x.shape[-1]
    if extra < 0:
        raise ValueError(f"`side` ({side}) must be >= the image side ({x.shape[-1]})")
    lo = extra // 2
    return F.pad(x, (lo, extra - lo, lo, extra - lo))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Isotropic Gaussian blur (std ``sigma`` pixels, zero padding) of ``(n, 1, h, w)`` images."""
    if sigma <= 0:
        return x
    r = max(1, int(round(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))


def load_digits(scale: int = 1, side: int | None = None, dtype: torch.dtype = torch.float32,
                blur: float = 0.0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), in [0, 1].

    ``scale`` > 1 upsamples bilinearly to ``8 * scale`` pixels (smooth strokes, so resampling
    by a rotation barely blurs them); the result is zero-padded to ``side`` (default
    ``12 * scale``, enough for any rotation to keep the digit in the frame).
    """
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    x = torch.as_tensor(d.images / 16.0, dtype=torch.float64).unsqueeze(1)
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    x = gaussian_blur(_pad(x, side or 12 * scale), blur).to(dtype)
    return Dataset(x, torch.as_tensor(d.target, dtype=torch.int64))


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read one idx file (optionally gzipped): big-endian int32 magic, dims, then uint8 data.

    Raises ``FileNotFoundError`` / ``ValueError`` naming ``path`` when the file is missing,
    has the wrong magic number, or is shorter than its header says.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file not found: {path}")
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    (magic,) = struct.unpack(">i", raw[:4])
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: bad idx magic number {magic}, expected {expected_magic} "
            f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'})"
        )
    if magic >> 8 != 0x08:  # type byte 0x08 = unsigned byte; dims in the low byte
        raise ValueError(f"{path}: idx magic {magic} is not an unsigned-byte idx file")
    ndim = magic & 0xFF
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes < {head})")
    dims = struct.unpack(">" + "i" * ndim, raw[4:head])
    n = int(np.prod(dims)) if dims else 0
    if len(raw) - head != n:
        raise ValueError(
            f"{path}: idx header declares dims {dims} ({n} bytes of data) but the file holds "
            f"{len(raw) - head}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(
        f"MNIST file {stem}[.gz] not found in {data_dir}; download the idx files from "
        "http://yann.lecun.com/exdb/mnist/ (or a mirror) into --data-dir"
    )


def load_mnist(
    data_dir: str | Path, split_name: str = "train", side: int = 28, limit: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """MNIST from the standard idx files in ``data_dir`` (``train-images-idx3-ubyte[.gz]`` ...)."""
    data_dir = Path(data_dir)
    prefix = {"train": "train", "test": "t10k"}[split_name]
    images = read_idx(_find(data_dir, f"{prefix}-images-idx3-ubyte"), IDX_IMAGES_MAGIC)
    labels = read_idx(_find(data_dir, f"{prefix}-labels-idx1-ubyte"), IDX_LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{data_dir}: MNIST images {images.shape} and labels {labels.shape} do not match"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.as_tensor(images.astype(np.float32) / 255.0, dtype=dtype).unsqueeze(1)
    return Dataset(_pad(x, side), torch.as_tensor(labels.astype(np.int64)))


def load(data_dir: str | Path | None = None, *, limit: int | None = None,
         dtype: torch.dtype = torch.float32) -> Dataset:
    """Digits when ``data_dir`` is None, else MNIST's training idx files from ``data_dir``."""
    if data_dir is None:
        ds = load_digits(dtype=dtype)
        return ds if limit is None else ds.subset(torch.arange(min(limit, len(ds))))
    return load_mnist(data_dir, "train", limit=limit, dtype=dtype)


def split(ds: Dataset, n_ft_train: int, n_ft_val: int, n_test: int, seed: int,
          n_pt: int | None = None) -> Splits:
    """Disjoint random PT / FT-train / FT-val / test splits (PT gets the rest, or ``n_pt``)."""
    n = len(ds)
    need = n_ft_train + n_ft_val + n_test + (n_pt or 1)
    if need > n:
        raise ValueError(f"splits need {need} examples, the dataset has {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b, c = n_ft_train, n_ft_train + n_ft_val, n_ft_train + n_ft_val + n_test
    pt_idx = perm[c:] if n_pt is None else perm[c : c + n_pt]
    return Splits(ds.subset(pt_idx), ds.subset(perm[:a]), ds.subset(perm[a:b]),
                  ds.subset(perm[b:c]))
