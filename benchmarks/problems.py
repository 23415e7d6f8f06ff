"""Benchmark problems: bi-level problems on synthetic data, at several sizes and dtypes.

Every problem has the same structure, so every method runs on every problem:

* ``params``: a dict of parameter tensors (``torch.func.functional_call`` style);
* ``hparams``: ``{"log_wd": one log weight decay per parameter leaf, "example_logits": one
  logit per training example}``; example ``i`` is weighted by ``2 sigmoid(logit_i)`` in the
  training loss (the per-example/per-task weights of Raghu et al. 2021), so the mixed product
  ``d2 f / d params d hparams`` is a real pass through the network, not a diagonal;
* ``inner_loss(params, hparams)``: weighted mean cross-entropy on a fixed training batch plus
  ``0.5 sum_leaf exp(log_wd_leaf) ||leaf||^2``;
* ``outer_loss(params, hparams)``: mean cross-entropy on a validation batch of the same size,
  so that the outer gradient costs about one inner gradient.

Networks use ``tanh`` and average pooling (smooth), and ``params`` is the inner optimum up to
``fit_steps`` full-batch L-BFGS steps run in float64 (then cast): close to stationary, with a
positive-definite Hessian in practice (weight decay 0.05), so CG runs all its iterations and
the IFT hypergradient means something. Fits are cached in ``benchmarks/.cache/``.

Sizes: ``logreg`` (10,010 params), ``mlp100k`` (128-512-64-10: 99,530, the MLP of issue 5),
``mlp1m`` (512-1024-512-10: 1,055,242), ``cnn`` (two 3x3 conv layers on 28x28: 9,098), and tiny
twins for the smoke test. ``small-logreg``/``small-mlp`` (~1k params) fit a dense Hessian.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CACHE = Path(os.environ.get("HYPERGRAD_BENCH_CACHE", Path(__file__).parent / ".cache"))


@dataclasses.dataclass
class BenchProblem:
    name: str
    params: dict[str, torch.Tensor]
    hparams: dict[str, torch.Tensor]
    inner_loss: Callable[[dict, dict], torch.Tensor]
    outer_loss: Callable[[dict, dict], torch.Tensor]
    dtype: torch.dtype
    n_params: int
    batch: int
    init: dict[str, torch.Tensor]  # the initialisation the fit started from (unroll start)
    model: nn.Module  # the architecture; its own parameters are unused (higher needs a module)
    data: dict[str, torch.Tensor]  # x_tr, y_tr, x_va, y_va
    # train_objective(logits, parameter leaves in model order, hparams) = inner loss
    train_objective: Callable[[torch.Tensor, list, dict], torch.Tensor]

    def fresh_params(self, requires_grad: bool = False) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in self.params.items()}

    def fresh_hparams(self, requires_grad: bool = False) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().requires_grad_(requires_grad)
                for k, v in self.hparams.items()}

    def direction(self, seed: int = 1) -> dict[str, torch.Tensor]:
        """A fixed random direction like ``params`` (the ``v`` of the products)."""
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(self.dtype)
                for k, v in self.params.items()}


def _mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _cnn(side: int, c1: int, c2: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (side // 4) ** 2, classes),
    )


_SPECS: dict[str, dict] = {
    "logreg": dict(model=lambda: _mlp([1000, 10]), shape=(1000,), classes=10, batch=512),
    "mlp100k": dict(model=lambda: _mlp([128, 512, 64, 10]), shape=(128,), classes=10, batch=512),
    "mlp1m": dict(model=lambda: _mlp([512, 1024, 512, 10]), shape=(512,), classes=10, batch=512),
    "cnn": dict(model=lambda: _cnn(28, 8, 16, 10), shape=(1, 28, 28), classes=10, batch=128),
    # a few thousand parameters: the dense Hessian of the accuracy reference fits
    "small-logreg": dict(model=lambda: _mlp([100, 10]), shape=(100,), classes=10, batch=256,
                         fit=300, wd=1e-3),
    "small-mlp": dict(model=lambda: _mlp([20, 40, 10]), shape=(20,), classes=10, batch=256,
                      fit=3000, wd=1e-2),
    # tiny twins for the smoke test
    "logreg-tiny": dict(model=lambda: _mlp([12, 3]), shape=(12,), classes=3, batch=16),
    "mlp-tiny": dict(model=lambda: _mlp([8, 16, 8, 3]), shape=(8,), classes=3, batch=16),
    "cnn-tiny": dict(model=lambda: _cnn(8, 2, 3, 3), shape=(1, 8, 8), classes=3, batch=8),
}
SIZES = ["logreg", "mlp100k", "mlp1m", "cnn"]
TINY = {"logreg": "logreg-tiny", "mlp100k": "mlp-tiny", "mlp1m": "mlp-tiny", "cnn": "cnn-tiny",
        "small-logreg": "logreg-tiny", "small-mlp": "mlp-tiny"}


def bench_size() -> str:
    """``HYPERGRAD_BENCH_SIZE``: ``tiny`` (smoke test), ``quick`` (default) or ``full``."""
    size = os.environ.get("HYPERGRAD_BENCH_SIZE", "quick")
    if size not in ("tiny", "quick", "full"):
        raise ValueError(f"HYPERGRAD_BENCH_SIZE must be tiny, quick or full, got {size!r}")
    return size


def resolve(name: str) -> str:
    """``name``, or its tiny twin when ``HYPERGRAD_BENCH_SIZE=tiny``."""
    return TINY.get(name, name) if bench_size() == "tiny" else name


def make_problem(
    name: str,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    fit_steps: int | None = None,
    weight_decay: float | None = None,
    batch: int | None = None,
) -> BenchProblem:
    """Problem ``name`` (a key of ``_SPECS``) in ``dtype``; deterministic given the arguments.

    Defaults: 100 L-BFGS steps and weight decay 0.05, except where the spec says otherwise.
    """
    spec = _SPECS[name]
    fit_steps = spec.get("fit", 100) if fit_steps is None else fit_steps
    weight_decay = spec.get("wd", 5e-2) if weight_decay is None else weight_decay
    n = batch or spec["batch"]
    g = torch.Generator().manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the same problem whatever the caller's default
    try:
        torch.manual_seed(seed)
        model = spec["model"]().double()
        torch.manual_seed(seed + 1)
        teacher = spec["model"]().double()
    finally:
        torch.set_default_dtype(default)
    x_tr = torch.randn((n, *spec["shape"]), generator=g, dtype=torch.float64)
    x_va = torch.randn((n, *spec["shape"]), generator=g, dtype=torch.float64)
    with torch.no_grad():
        # labels of a random teacher of the same architecture, 20% replaced at random
        def labels(x: torch.Tensor) -> torch.Tensor:
            y = teacher(x).argmax(1)
            flip = torch.rand(n, generator=g, dtype=torch.float32) < 0.2
            return torch.where(flip, torch.randint(0, spec["classes"], (n,), generator=g), y)

        y_tr, y_va = labels(x_tr), labels(x_va)
    names = [k for k, _ in model.named_parameters()]
    hparams = {
        "log_wd": torch.full((len(names),), float(torch.tensor(weight_decay).log()),
                             dtype=torch.float64),
        "example_logits": 0.5 * torch.randn(n, generator=g, dtype=torch.float64),
    }

    def build(dt: torch.dtype):
        xt, xv = x_tr.to(dt), x_va.to(dt)

        def train_objective(out: torch.Tensor, leaves: list, h: dict) -> torch.Tensor:
            ce = F.cross_entropy(out, y_tr, reduction="none")
            w = 2 * torch.sigmoid(h["example_logits"])
            wd = h["log_wd"].exp()
            reg = sum(wd[i] * (x**2).sum() for i, x in enumerate(leaves))
            return (w * ce).mean() + 0.5 * reg

        def inner_loss(p: dict, h: dict) -> torch.Tensor:
            out = torch.func.functional_call(model, p, (xt,))
            return train_objective(out, [p[k] for k in names], h)

        def outer_loss(p: dict, h: dict) -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(model, p, (xv,)), y_va)

        return inner_loss, outer_loss, train_objective, xt, xv

    key = f"{name}-{seed}-{n}-{fit_steps}-{weight_decay}-{torch.__version__}"
    path = CACHE / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    if fit_steps > 0 and path.exists():
        params = torch.load(path)
    else:
        inner64 = build(torch.float64)[0]
        params = _fit(inner64, params0, hparams, fit_steps)
        if fit_steps > 0:
            CACHE.mkdir(parents=True, exist_ok=True)
            torch.save(params, path)
    model = model.to(dtype)
    inner_loss, outer_loss, train_objective, xt, xv = build(dtype)
    params = {k: v.to(dtype) for k, v in params.items()}
    return BenchProblem(
        name=name, params=params, hparams={k: v.to(dtype) for k, v in hparams.items()},
        inner_loss=inner_loss, outer_loss=outer_loss, dtype=dtype,
        n_params=sum(v.numel() for v in params.values()), batch=n, model=model,
        init={k: v.to(dtype).clone() for k, v in params0.items()},
        data=dict(x_tr=xt, y_tr=y_tr, x_va=xv, y_va=y_va), train_objective=train_objective,
    )


def _fit(inner_loss, params0: dict, hparams: dict, steps: int) -> dict:
    """``steps`` iterations of full-batch L-BFGS on the inner loss (deterministic)."""
    p = {k: v.clone().requires_grad_(True) for k, v in params0.items()}
    if steps <= 0:
        return {k: v.detach() for k, v in p.items()}
    opt = torch.optim.LBFGS(list(p.values()), lr=1.0, max_iter=steps, history_size=20,
                            tolerance_grad=1e-12, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = inner_loss(p, hparams)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return {k: v.detach() for k, v in p.items()}
