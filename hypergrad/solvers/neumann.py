"""The truncated Neumann series (Lorraine et al. 2020) and the power iteration behind its
``alpha="auto"``; same ``solver(matvec, b, **options) -> SolveResult`` contract as ``cg``.

Neither reads anything back from the device: no host synchronisation per product (the
solution, the residual and the flags stay tensors), so a GPU never waits on them.

Example:
    >>> import torch, hypergrad as hg
    >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> res = hg.neumann(lambda v: A @ v, torch.ones(2, dtype=torch.float64), iterations=60)
    >>> bool(res.converged), int(res.iterations), res.stats["residual_estimate"]
    (True, 79, True)
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _checks, tree
from ..tree import Tree
from ._common import (
    Matvec,
    SolveResult,
    _checked_once,
    _count,
    _damped,
    _relative,
    _resolve_tol,
    _validate_b,
    _where,
    _zero_unless,
    _zero_unless_into,
)

__all__ = ["neumann", "power_iteration"]


def power_iteration(matvec: Matvec, v0: Tree, iterations: int = 20) -> tuple[torch.Tensor, int]:
    """Estimate of the largest-magnitude eigenvalue of ``H`` (signed) by power iteration.

    ``lambda = v^T H v`` at the last finite unit iterate ``v <- H v / ||H v||`` (a Rayleigh
    quotient, so ``|lambda| <= |lambda_max|`` for symmetric ``H``). Deterministic: starts from
    ``v0`` (no random state). Returns ``(lambda as a 0-dim tensor, matvecs used)``; every one
    of the ``iterations`` matvecs is spent (a zero or non-finite product freezes the estimate
    instead of stopping: stopping would need a host read per product).
    """
    iterations = _checks.positive_int(iterations, "iterations")
    _checks.tensor_tree(v0, "v0")
    n0 = torch.sqrt(tree.vdot(v0, v0))
    if not bool(n0 > 0):  # one host read, at the public entry only
        raise ValueError("`v0` must be non-zero and finite for power iteration, got norm "
                         f"{float(n0)}")
    return _power_iteration(matvec, v0, iterations), iterations


def _power_iteration(matvec: Matvec, v0: Tree, iterations: int) -> torch.Tensor:
    """Power iteration without host reads: masks freeze the estimate once a product is zero or
    non-finite; the matvec only ever sees finite unit vectors (or zeros for ``v0 = 0``)."""
    n0 = torch.sqrt(tree.vdot(v0, v0))
    ok = (n0 > 0) & torch.isfinite(n0)
    v = _zero_unless(ok, tree.scale(v0, 1.0 / torch.where(ok, n0, 1.0)))
    lam = torch.zeros_like(n0)
    for _ in range(iterations):
        hv = matvec(v)
        q = tree.vdot(v, hv)  # Rayleigh quotient, v has unit norm
        n = torch.sqrt(tree.vdot(hv, hv))
        lam = torch.where(ok & torch.isfinite(q), q, lam)
        ok = ok & torch.isfinite(n) & (n > 0)
        v = _where(ok, tree.scale(hv, 1.0 / torch.where(ok, n, 1.0)), v)
    return lam


def neumann(
    matvec: Matvec,
    b: Tree,
    *,
    iterations: int = 20,
    alpha: float | str = "auto",
    tol: float | None = None,
    power_iterations: int = 20,
    damping: float = 0.0,
    preconditioner: Tree | None = None,
    x0: Tree | None = None,
    exact_residual: bool = False,
) -> SolveResult:
    """Truncated Neumann series ``x = x0 + alpha D sum_{j=0}^{J-1} (I - alpha A D)^j r0``.

    ``J = iterations`` terms, ``A = H + damping I``, ``r0 = b - A x0`` (``r0 = b`` without
    ``x0``), ``D`` the diagonal ``preconditioner`` (``None``: ``D = I``). Without ``x0`` and
    ``D`` this is Lorraine et al. (AISTATS 2020), Eq. 9, ``x = alpha sum_{j<J} (I - alpha H)^j b``.
    The series converges iff ``0 < alpha < 2 / lambda_max(D^1/2 A D^1/2)`` for SPD ``A``.

    Cost: the J terms take J - 1 matvecs (term j+1 is term j minus ``alpha A D`` times it), as
    in the paper authors' loop. The residual of the J-term sum is the next term,
    ``b - A x = (I - alpha A D)^J r0``, one more matvec. So by default ``residual_norm`` is the
    free residual of the (J-1)-term partial sum, ``||(I - alpha A D)^(J-1) r0|| / ||b||``,
    flagged ``stats["residual_estimate"] = True`` (``converged`` is judged on it too). For SPD
    ``A``, ``D = I`` and ``0 < alpha < 2 / lambda_max`` every term is no longer than the one
    before (``||I - alpha A|| < 1``), so the estimate is an upper bound on the true residual of
    the returned x; with a preconditioner that holds in the ``D^1/2``-weighted norm only, and for
    an indefinite ``A`` or a larger ``alpha`` it is not a bound at all. ``exact_residual=True``
    spends the extra matvec and reports the exact residual (``residual_estimate = False``).
    ``J = 0`` returns ``x0`` (or 0) with its exact residual. ``stats["terms"]`` is ``J``: with
    ``J = 1`` the free residual is that of the starting point (``r0``), which says nothing about
    the returned one-term solution (an approximation by design, e.g. ``hg.sama``).

    ``iterations`` of the result counts every matvec: ``power_iterations`` (with
    ``alpha="auto"``) + 1 for ``x0`` (if given) + ``J - 1`` for the series (0 if ``J = 0``)
    + 1 for ``exact_residual`` (if ``J >= 1``).

    ``alpha="auto"`` estimates ``lambda_max`` of ``D^1/2 A D^1/2`` by ``power_iterations``
    matvecs started from ``b`` and uses ``alpha = 1 / lambda_max`` (a 0-dim tensor in
    ``stats["alpha"]``; ``stats["lambda_max"]``), which converges for SPD ``A`` as long as the
    estimate is within 2x of the truth (power iteration only underestimates). A non-positive
    estimate sets ``stats["nonpositive_curvature"]``: no ``alpha`` makes the series converge.

    A diverging series (``alpha`` too large) never returns NaN: the solution is the last
    partial sum whose scaled entries are certainly finite (bounded by ``max|acc| + max|term|``,
    one ``aminmax`` per term), with ``residual_norm = inf`` and ``converged = False``; the
    matvec never sees the overflowed terms (zeros instead). A non-finite ``b`` (or ``b - A x0``)
    gives ``converged = False``, a NaN ``residual_norm`` and the solution ``x0`` (or 0); the
    matvec sees that start once (no check is spent on it). The masks are bit operations on the
    solver's own tensors: no copy of ``b`` and no host read.

    No host synchronisation: no value is read back from the device (one read validates a
    ``preconditioner``); all ``iterations`` matvecs are always spent.

    Example:
        >>> import torch
        >>> H = torch.diag(torch.tensor([1.0, 100.0]))
        >>> r = neumann(lambda v: H @ v, torch.ones(2), iterations=1, alpha=1.0,
        ...             preconditioner=torch.tensor([1.0, 0.01]), exact_residual=True)
        >>> r.solution, float(r.residual_norm), int(r.iterations)   # D = H^-1: one term
        (tensor([1.0000, 0.0100]), 0.0, 1)
    """
    _checks.callable_(matvec, "matvec")
    ref = _validate_b(b)
    J = _checks.nonneg_int(iterations, "iterations")
    tol = _resolve_tol(tol, ref.dtype)
    power_iterations = _checks.positive_int(power_iterations, "power_iterations")
    damping = _checks.nonneg_number(damping, "damping")
    if not isinstance(exact_residual, bool):
        raise TypeError(f"`exact_residual` must be a bool, got {exact_residual!r}")
    if x0 is not None:
        _checks.like(x0, "x0", b, "b")
    step: float | torch.Tensor  # alpha: a number, or a 0-dim tensor for "auto"
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ValueError(f"`alpha` must be a positive number or 'auto', got {alpha!r}")
    else:
        step = _checks.positive_number(alpha, "alpha")
    d = None if preconditioner is None else _positive_diagonal(preconditioner, b)
    A = _damped(_checked_once(matvec, b), damping)

    def ad(v: Tree) -> Tree:  # v -> A D v
        return A(v if d is None else tree.map(torch.mul, d, v))

    b_norm = torch.sqrt(tree.vdot(b, b))
    spent = 0
    stats: dict[str, Any] = {}
    if alpha == "auto":
        sq = None if d is None else tree.map(torch.sqrt, d)

        def sym(v: Tree) -> Tree:  # D^(1/2) A D^(1/2): symmetric, same spectrum as A D
            if sq is None:
                return A(v)
            return tree.map(torch.mul, sq, A(tree.map(torch.mul, sq, v)))

        lam = _power_iteration(sym, b, power_iterations)
        spent += power_iterations
        stats["lambda_max"] = lam
        # a non-positive dominant eigenvalue: no alpha makes the series converge
        stats["nonpositive_curvature"] = (lam <= 0) & (b_norm > 0)
        step = torch.where(lam != 0, 1.0 / torch.where(lam != 0, lam.abs(), 1.0), 1.0)
    stats["alpha"] = step
    if x0 is None:
        p = b
    else:
        p = tree.sub(b, A(x0))
        spent += 1
    # p_j = (I - alpha A D)^j r0, the residual of the j-term partial sum `acc`
    b_finite = torch.isfinite(b_norm)
    ok0 = b_finite if x0 is None else b_finite & torch.isfinite(tree.vdot(p, p))
    ok = ok0
    acc, own = (p, False) if J >= 1 else (tree.zeros_like(b), True)  # own: ours to overwrite
    # alpha D acc must stay finite: a bound on its largest entry is max|acc| alpha max(D), and
    # max|acc + p| <= max|acc| + max|p| (NaN propagates through min/max and the sum)
    grow = step if d is None else step * torch.stack([t.max() for t in tree.leaves(d)]).max()
    acc_max = _max_abs(acc) if J >= 2 else b_norm  # (unused when J < 2)
    for _ in range(J - 1):
        p_new = tree.axpy(-step, ad(p), p)  # a new tensor: ours
        p_max = _max_abs(p_new)
        bound = acc_max + p_max
        ok = ok & torch.isfinite(bound * grow)
        # once not ok, every later term is 0: acc keeps the last finite partial sum and the
        # matvec sees zeros (bit masks in place: no new tensor, NaN/inf cannot leak through)
        p = _zero_unless_into(ok, p_new)
        if own:
            acc = tree.map(lambda a, q: a.add_(q), acc, p)
        else:
            acc, own = tree.add(acc, p), True
        acc_max = bound
        spent += 1
    estimate = J >= 1 and not exact_residual
    if J >= 1 and exact_residual:
        p = tree.axpy(-step, ad(p), p)  # the residual of the J-term sum
        spent += 1
    r_norm = torch.sqrt(tree.vdot(p, p))
    r_norm = torch.where(ok & torch.isfinite(r_norm), r_norm, float("inf"))
    residual = torch.where(b_finite, _relative(r_norm, b_norm), float("nan"))
    if d is not None:
        acc, own = tree.map(torch.mul, d, acc), True
    # scaled in place when acc is ours (not b), unless differentiable; then zeroed in place if
    # the start was not finite (a non-finite b or r0: the result is x0, or 0)
    dx = _scale_own(acc, step) if own else tree.scale(acc, step)
    dx = _zero_unless_into(ok0, dx)
    solution = dx if x0 is None else tree.add(x0, dx)
    stats["residual_estimate"] = estimate
    stats["terms"] = J
    return SolveResult(solution, _count(spent, b_norm), residual, residual <= tol, stats)


def _scale_own(t: Tree, s: float | torch.Tensor) -> Tree:
    """``s t`` for a tree of tensors the caller owns: in place, unless one needs a gradient."""
    return tree.map(lambda x: x.mul(s) if x.requires_grad or torch.is_grad_enabled() and
                    isinstance(s, torch.Tensor) and s.requires_grad else x.mul_(s), t)


def _max_abs(t: Tree) -> torch.Tensor:
    """``max |x|`` over all leaves (0-dim; NaN if a leaf holds one) from ``aminmax``: one pass
    per leaf, where an infinity norm costs ~15 on a CPU."""
    out = []
    for x in tree.leaves(t):
        if x.numel():
            lo, hi = torch.aminmax(x.detach())
            out += [lo.abs(), hi.abs()]
    if not out:
        x = tree.leaves(t)[0]
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.stack(out).max()


def _positive_diagonal(d: Tree, b: Tree) -> Tree:
    """``preconditioner`` checked: the structure and shapes of ``b``, entries finite and > 0
    (one host read for all leaves)."""
    tree.check_same_structure(d, b, ("preconditioner", "b"))  # also checks leaf shapes
    for x, y in zip(tree.leaves(d), tree.leaves(b)):
        if not isinstance(x, torch.Tensor) or x.device != y.device:
            raise ValueError(
                f"`preconditioner` leaves must be tensors on `b`'s device {y.device}, got "
                f"{getattr(x, 'device', type(x).__name__)}"
            )
    good = torch.stack([(torch.isfinite(x) & (x > 0)).all() for x in tree.leaves(d)]).all()
    if not bool(good):
        lo = min(float(x.min()) for x in tree.leaves(d))
        raise ValueError(f"`preconditioner` entries must be finite and > 0, got min {lo:.3g}")
    return tree.map(lambda x, y: x.to(dtype=y.dtype), d, b)
