"""The data an ECG run uses: PT pool, D_FT candidates and test set, from PTB-XL or the
synthetic stand-in (paper conventions: scalar standardisation fitted on the pool, signals
zero-padded from 1000 to 1024 samples)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from tasks.ecg.data import load_ptbxl, sample_ft_split
from tasks.ecg.synthetic import LABELS, make_synthetic_ecg

__all__ = ["Task", "synthetic_task", "ptbxl_task"]


@dataclass
class Task:
    """Non-test signals ``x``/``y`` with PT indices and D_FT candidate indices; the test set;
    ground-truth groups (synthetic only)."""

    x: torch.Tensor
    y: torch.Tensor
    pt_idx: np.ndarray
    ft_train_idx: np.ndarray
    ft_val_idx: np.ndarray | None  # None: D_FT val drawn from ft_train_idx (paper, 80/20)
    x_test: torch.Tensor
    y_test: torch.Tensor
    label_names: tuple[str, ...]
    name: str
    group_test: np.ndarray | None = None
    group: np.ndarray | None = None  # ground-truth groups of ``x`` (synthetic only)
    data_seed: int | None = None  # the synthetic pool's generator seed (test set: + 1)

    def to(self, device: torch.device) -> Task:
        """The tensors on ``device`` (indices and ground truth stay numpy on the host)."""
        return replace(self, x=self.x.to(device), y=self.y.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))

    def ft_split(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if self.ft_val_idx is None:
            return sample_ft_split(self.ft_train_idx, n, seed)
        n_tr = int(0.8 * n)
        rng = np.random.RandomState(seed)
        return (rng.permutation(self.ft_train_idx)[:n_tr],
                rng.permutation(self.ft_val_idx)[: n - n_tr])


def synthetic_task(n_pool: int, n_test: int, seed: int = 12345) -> Task:
    """Pool and test set from ``make_synthetic_ecg``, paper conventions (scalar
    standardisation fitted on the pool, zero-padding to 1024)."""
    pool = make_synthetic_ecg(n_pool, seed)
    test = make_synthetic_ecg(n_test, seed + 1)
    mean, std = float(pool.x.mean(dtype=np.float64)), float(pool.x.std(dtype=np.float64))

    def prep(a: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.pad(torch.from_numpy((a - mean) / std).float(), (0, 24))

    idx = np.arange(n_pool)
    return Task(prep(pool.x), torch.from_numpy(pool.y), idx, idx, None, prep(test.x),
                torch.from_numpy(test.y), LABELS, "synthetic", test.group, pool.group, seed)


def ptbxl_task(data_dir: str, labels: str, cache: str | None) -> Task:
    d = load_ptbxl(data_dir, labels, cache=cache)
    x, y = torch.from_numpy(d.x), torch.from_numpy(d.y)
    te = d.splits["test"]
    if labels == "paper":
        pool = d.splits["pool"]
        return Task(x, y, pool, pool, None, x[te], y[te], d.label_names, "ptbxl-paper")
    tr = d.splits["train"]
    return Task(x, y, tr, tr, d.splits["val"], x[te], y[te], d.label_names, "ptbxl-benchmark")
