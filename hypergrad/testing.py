"""Reference hypergradients, problems with closed-form answers, and hypothesis strategies.

Import these to property-test your own bi-level code:

    >>> import hypergrad as hg
    >>> from hypergrad import testing
    >>> prob = testing.ridge_problem(seed=0, n_features=5)
    >>> approx = hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams)
    >>> testing.compare(approx, prob.hypergrad).rel_error < 1e-5
    True

The strategies (``quadratic_problems()``, ``ridge_problems()``) need ``hypothesis`` and draw
only a seed and sizes, so failures shrink to a small reproducible problem:

    @hypothesis.given(testing.ridge_problems())
    def test_mine(prob): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _checks, tree
from .tree import Tree

__all__ = [
    "Problem",
    "quadratic_problem",
    "ridge_problem",
    "logistic_problem",
    "quadratic_problems",
    "ridge_problems",
    "dense_hessian",
    "dense_mixed",
    "reference_implicit_grad",
    "reference_unroll_grad",
    "Comparison",
    "compare",
    "check_hypergradient",
]


@dataclass
class Problem:
    """A bi-level problem: ``params`` minimises ``inner_loss(., hparams)``.

    ``hypergrad`` is the exact ``dL/dhparams`` at the exact optimum (closed form) or ``None``
    when only a numerical reference exists.
    """

    inner_loss: Callable[[Tree, Tree], torch.Tensor]
    outer_loss: Callable[[Tree, Tree], torch.Tensor]
    params: Tree
    hparams: Tree
    hypergrad: Tree | None
    extras: dict[str, Any] = field(default_factory=dict)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _spd(n: int, cond: float, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    eig = torch.logspace(0, float(torch.log10(torch.tensor(cond))), n, dtype=dtype)
    return (q * eig) @ q.T


def quadratic_problem(
    seed: int = 0, n_params: int = 6, n_hparams: int = 3, cond: float = 10.0,
    dtype: torch.dtype = torch.float64,
) -> Problem:
    """``f = 0.5 p^T A p - p^T (B h + c)``, ``L = 0.5 ||p - t||^2 + 0.5 h^T D h``.

    Exact: ``p* = A^{-1}(B h + c)`` and ``dL/dh = B^T A^{-1} (p* - t) + D h``.
    """
    _checks.positive_int(n_params, "n_params")
    _checks.positive_int(n_hparams, "n_hparams")
    if _checks.positive_number(cond, "cond") < 1:
        raise ValueError(f"`cond` must be >= 1 (a condition number), got {cond!r}")
    g = _gen(seed)
    A = _spd(n_params, cond, g, dtype)
    B = torch.randn(n_params, n_hparams, generator=g, dtype=dtype)
    c = torch.randn(n_params, generator=g, dtype=dtype)
    t = torch.randn(n_params, generator=g, dtype=dtype)
    D = torch.diag(torch.rand(n_hparams, generator=g, dtype=dtype))
    h = torch.randn(n_hparams, generator=g, dtype=dtype)

    def inner(p: Tree, h: Tree) -> torch.Tensor:
        return 0.5 * p["x"] @ A @ p["x"] - p["x"] @ (B @ h["h"] + c)

    def outer(p: Tree, h: Tree) -> torch.Tensor:
        return 0.5 * ((p["x"] - t) ** 2).sum() + 0.5 * h["h"] @ D @ h["h"]

    p_star = torch.linalg.solve(A, B @ h + c)
    grad = B.T @ torch.linalg.solve(A, p_star - t) + D @ h
    return Problem(inner, outer, {"x": p_star}, {"h": h}, {"h": grad}, {"A": A, "B": B})


def ridge_problem(
    seed: int = 0, n_features: int = 8, n_train: int = 40, n_val: int = 30,
    dtype: torch.dtype = torch.float64,
) -> Problem:
    """Ridge regression with one L2 strength per feature, ``lambda_j = exp(h_j)``.

    ``f(w, h) = ||X w - y||^2 / (2n) + 0.5 sum_j exp(h_j) w_j^2``, ``L = ||X_v w - y_v||^2 / (2m)``.
    With ``A = X^T X / n + diag(exp h)``: ``w* = A^{-1} X^T y / n`` and
    ``dL/dh_j = -exp(h_j) w*_j (A^{-1} X_v^T (X_v w* - y_v) / m)_j``.
    """
    for value, name in ((n_features, "n_features"), (n_train, "n_train"), (n_val, "n_val")):
        _checks.positive_int(value, name)
    g = _gen(seed)
    w_true = torch.randn(n_features, generator=g, dtype=dtype)
    X = torch.randn(n_train, n_features, generator=g, dtype=dtype)
    y = X @ w_true + 0.5 * torch.randn(n_train, generator=g, dtype=dtype)
    Xv = torch.randn(n_val, n_features, generator=g, dtype=dtype)
    yv = Xv @ w_true + 0.5 * torch.randn(n_val, generator=g, dtype=dtype)
    h = torch.randn(n_features, generator=g, dtype=dtype) - 1.0

    def inner(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return ((X @ w - y) ** 2).sum() / (2 * n_train) + 0.5 * (h.exp() * w**2).sum()

    def outer(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return ((Xv @ w - yv) ** 2).sum() / (2 * n_val)

    A = X.T @ X / n_train + torch.diag(h.exp())
    w_star = torch.linalg.solve(A, X.T @ y / n_train)
    u = torch.linalg.solve(A, Xv.T @ (Xv @ w_star - yv) / n_val)
    grad = -h.exp() * w_star * u
    return Problem(inner, outer, w_star, h, grad, {"X": X, "y": y, "Xv": Xv, "yv": yv})


def logistic_problem(
    seed: int = 0, n_features: int = 5, n_train: int = 60, n_val: int = 40,
    dtype: torch.dtype = torch.float64, newton_steps: int = 30,
) -> Problem:
    """L2-regularised logistic regression, per-feature strengths ``exp(h)``; no closed form.

    ``params`` is found by Newton's method to machine precision; ``hypergrad`` is ``None``
    (compare with :func:`reference_implicit_grad`).
    """
    g = _gen(seed)
    w_true = torch.randn(n_features, generator=g, dtype=dtype)
    X = torch.randn(n_train, n_features, generator=g, dtype=dtype)
    y = (torch.rand(n_train, generator=g, dtype=dtype) < torch.sigmoid(X @ w_true)).to(dtype)
    Xv = torch.randn(n_val, n_features, generator=g, dtype=dtype)
    yv = (torch.rand(n_val, generator=g, dtype=dtype) < torch.sigmoid(Xv @ w_true)).to(dtype)
    h = torch.randn(n_features, generator=g, dtype=dtype) - 2.0
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def inner(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return bce(X @ w, y) + 0.5 * (h.exp() * w**2).sum()

    def outer(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return bce(Xv @ w, yv)

    w = torch.zeros(n_features, dtype=dtype)
    eps = torch.finfo(dtype).eps
    for _ in range(newton_steps):
        H = dense_hessian(inner, w, h)
        gr = torch.func.grad(inner)(w, h)
        step = torch.linalg.solve(H, gr)
        w = w - step
        if float(step.norm()) <= eps * (1 + float(w.norm())):
            break  # converged to machine precision (Newton is quadratic; ~6 steps here)
    return Problem(inner, outer, w, h, None, {"X": X, "y": y})


def dense_hessian(fn: Callable[..., torch.Tensor], params: Tree, *args: Any) -> torch.Tensor:
    """The full ``n x n`` Hessian of ``fn(params, *args)`` over the flattened params."""
    _checks.callable_(fn, "fn")
    _checks.tensor_tree(params, "params")
    vec, unravel = tree.ravel(tree.detach(params))
    return torch.func.hessian(lambda v: fn(unravel(v), *args))(vec)


def dense_mixed(fn: Callable[[Tree, Tree], torch.Tensor], params: Tree, hparams: Tree):
    """The ``n_params x n_hparams`` matrix ``d2 fn / (d params d hparams)``."""
    _checks.callable_(fn, "fn")
    _checks.tensor_tree(params, "params")
    _checks.tensor_tree(hparams, "hparams")
    pv, unravel_p = tree.ravel(tree.detach(params))
    hv, unravel_h = tree.ravel(tree.detach(hparams))

    def grad_p(h: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(lambda p: fn(unravel_p(p), unravel_h(h)))(pv)

    return torch.func.jacrev(grad_p)(hv)


def reference_implicit_grad(
    inner_loss: Callable[[Tree, Tree], torch.Tensor],
    outer_loss: Callable[[Tree, Tree], torch.Tensor],
    params: Tree,
    hparams: Tree,
) -> Tree:
    """IFT hypergradient with a dense Hessian and a direct solve (small problems only)."""
    _checks.callable_(outer_loss, "outer_loss")
    H = dense_hessian(inner_loss, params, hparams)
    M = dense_mixed(inner_loss, params, hparams)
    pv, unravel_p = tree.ravel(tree.detach(params))
    hv, unravel_h = tree.ravel(tree.detach(hparams))
    gp, gh = torch.func.grad(
        lambda p, h: outer_loss(unravel_p(p), unravel_h(h)), argnums=(0, 1)
    )(pv, hv)
    total = gh - M.T @ torch.linalg.solve(H, gp)  # Eq. of the IFT, dense
    return unravel_h(total)


def reference_unroll_grad(
    step: Callable[[Tree, Tree, int], Tree],
    params0: Tree,
    hparams: Tree,
    steps: int,
    outer_loss: Callable[[Tree, Tree], torch.Tensor],
) -> Tree:
    """Exact gradient of ``outer_loss(params_T, hparams)`` through all ``steps`` steps."""
    _checks.callable_(step, "step")
    _checks.nonneg_int(steps, "steps")
    _checks.tensor_tree(hparams, "hparams")
    hf, hs = tree.flatten(hparams)
    h = [x.detach().requires_grad_(True) for x in hf]
    hp = tree.unflatten(h, hs)
    p = params0
    for t in range(steps):
        p = step(p, hp, t)
    grads = torch.autograd.grad(outer_loss(p, hp), h, allow_unused=True)
    return tree.unflatten([torch.zeros_like(x) if g is None else g for x, g in zip(h, grads)], hs)


@dataclass
class Comparison:
    """How close ``approx`` is to ``reference``: overall and per leaf (by pytree path)."""

    cosine: float
    rel_error: float
    per_leaf: dict[str, tuple[float, float]]

    def __str__(self) -> str:
        rows = [f"cosine {self.cosine:.6f}  rel_error {self.rel_error:.3e}"]
        rows += [f"  {k}: cosine {c:.6f}  rel_error {e:.3e}" for k, (c, e) in self.per_leaf.items()]
        return "\n".join(rows)


def _cos_rel(a: torch.Tensor, r: torch.Tensor) -> tuple[float, float]:
    a, r = a.reshape(-1).double(), r.reshape(-1).double()
    rn, an = torch.linalg.vector_norm(r), torch.linalg.vector_norm(a)
    err = torch.linalg.vector_norm(a - r)
    rel = float(err / rn) if rn > 0 else float(err)
    cos = float(a @ r / (an * rn)) if an > 0 and rn > 0 else float(an == rn)
    return cos, rel


def compare(approx: Tree, reference: Tree) -> Comparison:
    """Cosine similarity and relative error ``||a - r|| / ||r||``, overall and per leaf."""
    tree.check_same_structure(reference, approx, names=("reference", "approx"))
    from torch.utils import _pytree as pytree

    paths = pytree.tree_flatten_with_path(reference)[0]
    af = tree.leaves(approx)
    per = {pytree.keystr(k) or "<root>": _cos_rel(a, r) for (k, r), a in zip(paths, af)}
    cat = lambda xs: torch.cat([x.detach().reshape(-1).double() for x in xs])  # noqa: E731
    cos, rel = _cos_rel(cat(af), cat([r for _, r in paths]))
    return Comparison(cos, rel, per)


def check_hypergradient(
    inner_loss: Callable[[Tree, Tree], torch.Tensor],
    outer_loss: Callable[[Tree, Tree], torch.Tensor],
    params: Tree,
    hparams: Tree,
    approx: Tree | None = None,
    **implicit_kwargs: Any,
) -> Comparison:
    """One call: compare ``approx`` (default: ``implicit_grad(..., **implicit_kwargs)``) with
    the dense-Hessian reference on your own (small) problem. Print the result to read it."""
    if approx is None:
        from .implicit import implicit_grad

        approx = implicit_grad(inner_loss, outer_loss, params, hparams, **implicit_kwargs)
    return compare(approx, reference_implicit_grad(inner_loss, outer_loss, params, hparams))


def quadratic_problems(max_params: int = 12, max_hparams: int = 5, max_cond: float = 100.0):
    """Hypothesis strategy of :func:`quadratic_problem` instances (float64)."""
    from hypothesis import strategies as st

    return st.builds(
        quadratic_problem,
        seed=st.integers(0, 2**31 - 1),
        n_params=st.integers(1, max_params),
        n_hparams=st.integers(1, max_hparams),
        cond=st.floats(1.0, max_cond),
    )


def ridge_problems(max_features: int = 10):
    """Hypothesis strategy of :func:`ridge_problem` instances (float64)."""
    from hypothesis import strategies as st

    return st.builds(
        ridge_problem,
        seed=st.integers(0, 2**31 - 1),
        n_features=st.integers(1, max_features),
        n_train=st.integers(5, 50),
        n_val=st.integers(3, 30),
    )
