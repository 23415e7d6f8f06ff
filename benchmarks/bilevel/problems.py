"""The four problems of BenchOpt's bilevel benchmark (benchopt/benchmark_bilevel), in torch.

Every problem is ``min_h L(theta*(h), h)`` s.t. ``theta*(h) = argmin_theta f(theta, h)``, with
``f`` and ``L`` means over samples, so a minibatch (``idx``) gives an unbiased estimate:

* ``quadratic``: BenchOpt's ``datasets/simulated.py`` + ``benchmark_utils/gen_matrices.py``
  (dim_inner 100, dim_outer 10, n_inner 32,768, n_outer 1,024, mu 0.1, L 1, cross 0.1). Each
  sample is ``f_i(z, x) = z'A_i z / 2 + x'B_i x / 2 + x'C_i z + l_i'z + m_i'x`` with the rank-one
  ``A_i = a_i a_i'``, ``B_i = w_i w_i'``, ``C_i = c_i b_i'`` that ``gen_matrices`` builds
  (``X.T @ X`` of one row). We keep the factors ``a, w, c, b`` instead of the n x d x d
  matrices (32,768 x 100 x 100 floats would be 2.6 GB): the function is the same. The
  random streams are torch's (the construction, not the bits, of JAX's PRNG is reproduced);
  the 20-trial retry until the value function's Hessian is positive is kept.
* ``ijcnn1``/``breast_cancer``: binary logistic regression, one L2 strength per feature,
  ``f = mean log(1 + exp(-y x'theta)) + sum_j exp(h_j) theta_j^2 / 2`` (BenchOpt's ``exp``
  parametrisation). ijcnn1 (49,990 x 22 train, 91,701 test-as-validation) is replaced by
  ``make_classification`` at that shape unless a libsvm file is given; ``breast_cancer`` is
  the real sklearn dataset (569 x 30).
* ``covtype``: multinomial logistic regression, one L2 strength per class,
  ``f = mean CE + sum_k exp(h_k) ||theta_:k||^2 / 2``; covtype (581,012 x 54, 7 classes) is
  replaced by ``load_digits`` (1,797 x 64, 10 classes) unless a libsvm file is given.
* ``datacleaning``: MNIST hyper-cleaning, labels replaced by uniform draws with probability
  0.5, one weight ``sigmoid(h_i)`` per training sample, linear multinomial model,
  ``f = mean sigmoid(h_i) CE_i + 0.2 ||theta||^2`` (BenchOpt's ``reg``); MNIST is replaced by
  ``load_digits`` unless an idx folder is given.

Inner variables are flat vectors (BenchOpt's ``inner_var``); ``theta0``/``h0`` are BenchOpt's
starts (zeros and ``-2``, random for ijcnn1-type problems as in its ``init_var``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import data as bdata

Loss = Callable[..., torch.Tensor]


@dataclasses.dataclass
class Problem:
    """One bilevel problem. ``inner(theta, h, idx=None)``, ``outer(theta, h, idx=None)``:
    ``idx`` (a LongTensor of sample indices) selects a minibatch, ``None`` the full batch."""

    name: str
    inner: Loss
    outer: Loss
    n_inner: int
    n_outer: int
    theta0: torch.Tensor
    h0: torch.Tensor
    lipschitz: float  # the data part of the inner smoothness bound (+ the reg's, if constant)
    outer_lr: float  # outer step of the deterministic loops (BenchOpt tunes it per solver)
    outer_ratio: float  # stochastic loops: outer step = outer_lr * inner_lr / outer_ratio
    kind: str  # "quadratic" | "binary" | "multiclass" | "cleaning"
    substitute: str  # what stands in for the original data ("" if the original is used)
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def smoothness(self, h: torch.Tensor) -> float:
        """A bound on the inner Hessian's largest eigenvalue at ``h``: the inner step is its
        inverse. The L2 strength ``exp(h)`` of the logistic problems moves with ``h`` (one
        host read per outer step); elsewhere it is a constant."""
        if self.kind in ("binary", "multiclass"):
            return self.lipschitz + float(torch.exp(h.detach()).max())
        return self.lipschitz

    def bind(self, fn: Loss, idx: torch.Tensor | None = None) -> Callable:
        """``(theta, h) -> fn(theta, h, idx)``: the two-argument loss hypergrad expects."""
        return lambda theta, h: fn(theta, h, idx)


# ------------------------------------------------------------------------------- quadratic


def _logspace(lo: float, hi: float, n: int) -> torch.Tensor:
    return torch.logspace(lo, hi, n, dtype=torch.float64)


def gen_matrices(
    n: int,
    d_in: int,
    d_out: int,
    L_in: float,
    L_out: float,
    L_cross: float,
    mu: float,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """``benchmark_utils/gen_matrices.py`` with the rank-one factors kept (see module doc)."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    U, _, _ = torch.linalg.svd(randn(d_in, 1))  # full U: a random orthogonal basis
    D = _logspace(math.log10(mu) / 2, math.log10(L_in) / 2, d_in)
    a = randn(n, d_in) @ (U @ torch.diag(D) @ U.T)  # hess_inner_i = a_i a_i'
    U, _, _ = torch.linalg.svd(randn(d_out, 1))
    D = torch.cat(
        [
            torch.zeros(1, dtype=torch.float64),
            _logspace(math.log10(mu) / 2, math.log10(L_out) / 2, d_out - 1),
        ]
    )
    w = randn(n, d_out) @ (U @ torch.diag(D) @ U.T)  # hess_outer_i = w_i w_i'
    U, _, Vh = torch.linalg.svd(randn(d_out, d_in))
    k = min(d_out, d_in)
    Dc = torch.zeros(d_out, d_in, dtype=torch.float64)
    Dc[:k, :k] = torch.diag(_logspace(math.log10(mu), math.log10(L_cross), k))
    x = randn(n, d_in)
    c = x @ (U @ Dc).T  # X1 = U D x'   (d_out)
    b = x @ Vh.T  # X2 = x V'          (d_in): cross_i = c_i b_i'
    return {"a": a, "w": w, "c": c, "b": b, "l": randn(n, d_in), "m": randn(n, d_out)}


def _quad_means(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = t["a"].shape[0]
    return {
        "Hzz": t["a"].T @ t["a"] / n,
        "Hxx": t["w"].T @ t["w"] / n,
        "C": t["c"].T @ t["b"] / n,
        "l": t["l"].mean(0),
        "m": t["m"].mean(0),
    }


def _value_hessian_min_eig(fi: dict, fo: dict) -> float:
    """``get_hessian_min_eigval`` of ``datasets/simulated.py``."""
    jac = -torch.linalg.solve(fi["Hzz"], fi["C"].T)
    hess = jac.T @ fo["Hzz"] @ jac + fo["Hxx"]
    tmp = fo["C"] @ jac
    hess = hess + 0.5 * (tmp + tmp.T)
    return float(torch.linalg.eigvalsh(hess).min())


def value_hessian(fi: dict, fo: dict) -> torch.Tensor:
    """The Hessian of ``h -> L(theta*(h), h)`` (a quadratic: theta* is affine in h)."""
    jac = -torch.linalg.solve(fi["Hzz"], fi["C"].T)
    tmp = fo["C"] @ jac
    return jac.T @ fo["Hzz"] @ jac + fo["Hxx"] + tmp + tmp.T


def quad_loss(t: dict[str, torch.Tensor]) -> Loss:
    def loss(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        s = t if idx is None else {k: v[idx] for k, v in t.items()}
        az, wx = s["a"] @ z, s["w"] @ x
        val = 0.5 * az * az + 0.5 * wx * wx + (s["c"] @ x) * (s["b"] @ z)
        return (val + s["l"] @ z + s["m"] @ x).mean()

    return loss


def quadratic(
    seed: int = 2442,
    *,
    n_inner: int = 32768,
    n_outer: int = 1024,
    dim_inner: int = 100,
    dim_outer: int = 10,
    mu: float = 0.1,
    L: float = 1.0,
    L_cross: float = 0.1,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    for trials in range(1, 21):  # noqa: B007 (read after the loop)
        ti = gen_matrices(n_inner, dim_inner, dim_outer, L, L, L_cross, mu, gen)
        to = gen_matrices(n_outer, dim_inner, dim_outer, L, L, L_cross, mu, gen)
        fi, fo = _quad_means(ti), _quad_means(to)
        eig = _value_hessian_min_eig(fi, fo)
        if eig >= 1e-12:
            break
    else:
        raise ValueError("quadratic: no positive value-function Hessian in 20 trials")
    cast = {"dtype": dtype, "device": device}
    ti = {k: v.to(**cast) for k, v in ti.items()}
    to = {k: v.to(**cast) for k, v in to.items()}
    exact = {f"in_{k}": v for k, v in fi.items()} | {f"out_{k}": v for k, v in fo.items()}
    L_in = float(torch.linalg.eigvalsh(fi["Hzz"]).max())
    spec = torch.linalg.eigvalsh(value_hessian(fi, fo))
    return Problem(
        name="quadratic",
        inner=quad_loss(ti),
        outer=quad_loss(to),
        n_inner=n_inner,
        n_outer=n_outer,
        theta0=torch.zeros(dim_inner, **cast),
        h0=torch.full((dim_outer,), -2.0, **cast),
        lipschitz=L_in,
        outer_lr=1.0 / float(spec.max()),  # 1 / L of the value function
        outer_ratio=1.0,
        kind="quadratic",
        substitute="",
        tensors={k: v.to(device) for k, v in exact.items()}
        | {f"data_in_{k}": v for k, v in ti.items()}
        | {f"data_out_{k}": v for k, v in to.items()},
        info={
            "trials": trials,
            "value_hessian_min_eig": eig,  # BenchOpt's check (its half cross term)
            "value_hessian_spectrum": [float(spec.min()), float(spec.max())],
            "mu": mu,
            "L": L,
            "L_cross": L_cross,
            "dim_inner": dim_inner,
            "dim_outer": dim_outer,
        },
    )


# ------------------------------------------------------------------------- classification


def _binary(theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.softplus(-y * (X @ theta))  # -log sigmoid(y x'theta), per sample


def _multi(theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(X @ theta.view(X.shape[1], -1), y, reduction="none")


def _tensors(splits: dict[str, np.ndarray], dtype, device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in splits.items():
        is_label = k.startswith("y") or k.endswith("mask")
        out[k] = torch.as_tensor(
            v, device=device, dtype=(torch.long if v.dtype.kind in "iub" and is_label else dtype)
        )
    return out


def _lipschitz(X: np.ndarray, scale: float) -> float:
    """``scale * lambda_max(X'X / n)``: the data part of the inner Hessian's bound."""
    return scale * float(np.linalg.eigvalsh(X.T @ X / X.shape[0]).max())


def logreg_features(
    splits: dict[str, np.ndarray],
    name: str,
    substitute: str,
    seed: int,
    dtype=torch.float32,
    device: str = "cpu",
    outer_lr: float = 100.0,
) -> Problem:
    """Binary logistic regression with one L2 strength ``exp(h_j)`` per feature (ijcnn1)."""
    t = _tensors(splits, dtype, device)
    Xtr, ytr, Xva, yva = t["X_train"], t["y_train"], t["X_val"], t["y_val"]

    def inner(theta, h, idx=None):
        X, y = (Xtr, ytr) if idx is None else (Xtr[idx], ytr[idx])
        return _binary(theta, X, y).mean() + 0.5 * (torch.exp(h) * theta * theta).sum()

    def outer(theta, h, idx=None):
        X, y = (Xva, yva) if idx is None else (Xva[idx], yva[idx])
        return _binary(theta, X, y).mean()

    d = Xtr.shape[1]
    gen = torch.Generator().manual_seed(seed)  # BenchOpt's init_var: normal / log uniform
    theta0 = torch.randn(d, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    h0 = torch.log(torch.rand(d, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device)
    L = _lipschitz(splits["X_train"], 0.25)  # + max exp(h), see Problem.smoothness
    return Problem(
        name=name,
        inner=inner,
        outer=outer,
        n_inner=len(ytr),
        n_outer=len(yva),
        theta0=theta0,
        h0=h0,
        lipschitz=L,
        outer_lr=outer_lr,  # ||grad h|| starts near 1e-2..1e-3: a unit step would not move h
        outer_ratio=30.0,  # SOBA blew exp(h) up at 10 (its first v and theta are far off)
        kind="binary",
        substitute=substitute,
        tensors=t,
    )


def logreg_classes(
    splits: dict[str, np.ndarray],
    name: str,
    substitute: str,
    dtype=torch.float32,
    device: str = "cpu",
) -> Problem:
    """Multinomial logistic regression with one L2 strength ``exp(h_k)`` per class (covtype)."""
    t = _tensors(splits, dtype, device)
    Xtr, ytr, Xva, yva = t["X_train"], t["y_train"], t["X_val"], t["y_val"]
    d, k = Xtr.shape[1], int(max(int(ytr.max()), int(yva.max()))) + 1

    def inner(theta, h, idx=None):
        X, y = (Xtr, ytr) if idx is None else (Xtr[idx], ytr[idx])
        sq = (theta.view(d, k) ** 2).sum(0)
        return _multi(theta, X, y).mean() + 0.5 * (torch.exp(h) * sq).sum()

    def outer(theta, h, idx=None):
        X, y = (Xva, yva) if idx is None else (Xva[idx], yva[idx])
        return _multi(theta, X, y).mean()

    L = _lipschitz(splits["X_train"], 0.5)  # + max exp(h), see Problem.smoothness
    return Problem(
        name=name,
        inner=inner,
        outer=outer,
        n_inner=len(ytr),
        n_outer=len(yva),
        theta0=torch.zeros(d * k, dtype=dtype, device=device),
        h0=torch.full((k,), -2.0, dtype=dtype, device=device),
        lipschitz=L,
        outer_lr=10.0,
        outer_ratio=1.0,
        kind="multiclass",
        substitute=substitute,
        tensors=t,
        info={"classes": k},
    )


def datacleaning(
    splits: dict[str, np.ndarray],
    name: str,
    substitute: str,
    reg: float = 0.2,
    dtype=torch.float32,
    device: str = "cpu",
) -> Problem:
    """Hyper-cleaning: one weight ``sigmoid(h_i)`` per training sample, reg ``||theta||^2``."""
    t = _tensors(splits, dtype, device)
    Xtr, ytr, Xva, yva = t["X_train"], t["y_train"], t["X_val"], t["y_val"]
    d, k = Xtr.shape[1], 10

    def inner(theta, h, idx=None):
        if idx is None:
            X, y, hh = Xtr, ytr, h
        else:
            X, y, hh = Xtr[idx], ytr[idx], h[idx]
        return (torch.sigmoid(hh) * _multi(theta, X, y)).mean() + reg * (theta * theta).sum()

    def outer(theta, h, idx=None):
        X, y = (Xva, yva) if idx is None else (Xva[idx], yva[idx])
        return _multi(theta, X, y).mean()

    L = _lipschitz(splits["X_train"], 0.5) + 2 * reg
    return Problem(
        name=name,
        inner=inner,
        outer=outer,
        n_inner=len(ytr),
        n_outer=len(yva),
        theta0=torch.zeros(d * k, dtype=dtype, device=device),
        h0=torch.full((len(ytr),), -2.0, dtype=dtype, device=device),
        lipschitz=L,
        outer_lr=float(len(ytr)) / 10,
        outer_ratio=1.0,
        kind="cleaning",
        substitute=substitute,
        tensors=t,
        info={"reg": reg, "classes": k},
    )


# ----------------------------------------------------------------------------- registry

PROBLEMS = ("quadratic", "ijcnn1", "breast_cancer", "covtype", "datacleaning")
SIZES = ("full", "quick", "tiny")


def make_problem(
    name: str,
    *,
    size: str = "full",
    seed: int = 2442,
    data_dir: str | None = None,
    dtype=torch.float32,
    device: str = "cpu",
) -> Problem:
    """Build a problem by name. ``size``: ``"full"`` (BenchOpt's sizes, or the stand-in's),
    ``"quick"`` (quadratic n_inner 4,096, ijcnn1 stand-in 5,000 + 5,000) or ``"tiny"`` (the
    tests' sizes); ``data_dir`` reads the original datasets from local files (no download)."""
    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {SIZES}")
    kw = {"dtype": dtype, "device": device}
    tiny = size == "tiny"
    if name == "quadratic":
        sizes = {
            "full": {},
            "quick": {"n_inner": 4096, "n_outer": 1024},
            "tiny": {"n_inner": 256, "n_outer": 128, "dim_inner": 20, "dim_outer": 5},
        }[size]
        return quadratic(seed, **sizes, **kw)
    if name == "ijcnn1":
        splits, sub = bdata.ijcnn1(data_dir, size=size, seed=seed)
        return logreg_features(splits, name, sub, seed, **kw)
    if name == "breast_cancer":
        # nearly separable: a large outer step drives some exp(h_j) to 0 and theta* off to
        # infinity (the amortised loop did at 100)
        return logreg_features(bdata.breast_cancer(seed), name, "", seed, outer_lr=10.0, **kw)
    if name == "covtype":
        splits, sub = bdata.covtype(data_dir, seed=seed, max_samples=300 if tiny else None)
        return logreg_classes(splits, name, sub, **kw)
    if name == "datacleaning":
        n = {"n_train": 150, "n_val": 100} if tiny else {}
        splits, sub = bdata.cleaning(data_dir, seed=seed, **n)
        return datacleaning(splits, name, sub, **kw)
    raise ValueError(f"problem={name!r}: expected one of {PROBLEMS}")
