"""The truncated Neumann series (Lorraine et al. 2020) and the power iteration behind its
``alpha="auto"``; same ``solver(matvec, b, **options) -> SolveResult`` contract as ``cg``.

Example:
    >>> import torch, hypergrad as hg
    >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> res = hg.neumann(lambda v: A @ v, torch.ones(2, dtype=torch.float64), iterations=60)
    >>> bool(res.converged)
    True
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _checks, tree
from ..tree import Tree
from ._common import Matvec, SolveResult, _check_matvec_output, _validate_b

__all__ = ["neumann", "power_iteration"]


def power_iteration(matvec: Matvec, v0: Tree, iterations: int = 20) -> tuple[torch.Tensor, int]:
    """Estimate of the largest-magnitude eigenvalue of ``H`` (signed) by power iteration.

    Deterministic: starts from ``v0`` (no random state). Returns ``(lambda, matvecs used)``.
    """
    iterations = _checks.positive_int(iterations, "iterations")
    n0 = tree.norm(v0)
    if float(n0) == 0:
        raise ValueError("`v0` must be non-zero for power iteration")
    v = tree.scale(v0, 1.0 / n0)
    lam = torch.zeros((), dtype=n0.dtype)
    used = 0
    for _ in range(iterations):
        hv = matvec(v)
        used += 1
        lam = tree.vdot(v, hv)  # Rayleigh quotient, v has unit norm
        n = tree.norm(hv)
        if not bool(torch.isfinite(n)) or float(n) == 0:
            break
        v = tree.scale(hv, 1.0 / n)
    return lam, used


def neumann(
    matvec: Matvec,
    b: Tree,
    *,
    iterations: int = 20,
    alpha: float | str = "auto",
    tol: float = 1e-6,
    power_iterations: int = 20,
    damping: float = 0.0,
    preconditioner: Tree | None = None,
) -> SolveResult:
    """Truncated Neumann series ``x = alpha * sum_{j=0}^{J-1} (I - alpha H)^j b`` (J = iterations).

    Lorraine et al. (AISTATS 2020), Eq. 9. The series converges iff ``0 < alpha < 2/lambda_max``
    for SPD ``H``. Its residual is known exactly without another matvec:
        b - H x = (I - alpha H)^J b,
    the next term of the series, so ``residual_norm`` is exact. A diverging series (alpha too
    large for the spectrum) stops as soon as a term is non-finite and reports
    ``converged=False`` with ``residual_norm`` > 1 or inf; the returned solution is the last
    finite partial sum, never NaN.

    ``alpha="auto"`` estimates ``lambda_max`` by ``power_iterations`` matvecs (started from
    ``b``) and uses ``alpha = 1 / lambda_max``, which converges for any SPD ``H`` as long as the
    estimate is within 2x of the truth (power iteration only underestimates). Those matvecs
    are counted in ``iterations`` of the result.

    ``damping`` solves ``(H + damping I) x = b`` instead (Tikhonov), as every solver does.

    ``preconditioner`` (a tree like ``b`` of positive entries D, e.g. an adaptive optimizer's
    per-coordinate step sizes) gives the diagonally preconditioned series
        x = sum_{j<J} (I - alpha D H)^j alpha D b = alpha D sum_{j<J} (I - alpha H D)^j b,
    the J-step response of preconditioned gradient descent; its residual is still exact,
        b - H x = (I - alpha H D)^J b,
    and ``alpha="auto"`` uses the largest eigenvalue of D^(1/2) H D^(1/2) (= that of H D).
    ``preconditioner=None`` is D = I.

    Example:
        >>> import torch
        >>> H = torch.diag(torch.tensor([1.0, 100.0]))
        >>> r = neumann(lambda v: H @ v, torch.ones(2), iterations=1, alpha=1.0,
        ...             preconditioner=torch.tensor([1.0, 0.01]))
        >>> r.solution, float(r.residual_norm)   # D = H^-1: exact after one term
        (tensor([1.0000, 0.0100]), 0.0)
    """
    _checks.callable_(matvec, "matvec")
    ref = _validate_b(b)
    J = _checks.nonneg_int(iterations, "iterations")
    tol = _checks.nonneg_number(tol, "tol")
    power_iterations = _checks.positive_int(power_iterations, "power_iterations")
    damping = _checks.nonneg_number(damping, "damping")
    if damping:
        undamped = matvec

        def matvec(v: Tree) -> Tree:  # (H + damping I) v
            return tree.axpy(damping, v, undamped(v))
    d = None if preconditioner is None else _positive_diagonal(preconditioner, b)

    def hd(v: Tree) -> Tree:  # v -> H D v
        return matvec(v if d is None else tree.map(torch.mul, d, v))
    spent = 0
    stats: dict[str, Any] = {}
    b_norm = tree.norm(b)
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ValueError(f"`alpha` must be a positive number or 'auto', got {alpha!r}")
        if float(b_norm) == 0.0:
            alpha_value = 1.0
        else:
            sq = None if d is None else tree.map(torch.sqrt, d)

            def sym(v: Tree) -> Tree:  # D^(1/2) H D^(1/2): symmetric, same spectrum as H D
                if sq is None:
                    return matvec(v)
                return tree.map(torch.mul, sq, matvec(tree.map(torch.mul, sq, v)))

            lam, spent = power_iteration(sym, b, power_iterations)
            stats["lambda_max"] = lam
            if not bool(lam > 0):
                # H has a non-positive dominant eigenvalue: no alpha makes the series converge.
                stats["nonpositive_curvature"] = torch.tensor(True)
                alpha_value = 1.0 / float(abs(lam)) if float(lam) != 0 else 1.0
            else:
                alpha_value = 1.0 / float(lam)
    else:
        alpha_value = _checks.positive_number(alpha, "alpha")
    stats["alpha"] = alpha_value
    if float(b_norm) == 0.0:
        zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
        return SolveResult(tree.zeros_like(b), torch.tensor(spent), zero, torch.tensor(True), stats)
    p = b  # p_j = (I - alpha H D)^j b   (D = I without a preconditioner)
    acc = b  # sum_{i<=j} p_i
    total = tree.zeros_like(b)  # the partial sum whose residual is p
    residual = torch.ones((), dtype=b_norm.dtype)
    for j in range(J):
        hp = hd(p)
        if j == 0:
            _check_matvec_output(hp, b)
        spent += 1
        p_next = tree.axpy(-alpha_value, hp, p)
        p_norm = tree.norm(p_next)
        if not bool(torch.isfinite(p_norm)):
            residual = torch.tensor(float("inf"), dtype=b_norm.dtype)
            break
        total = acc
        p = p_next
        acc = tree.add(acc, p)
        residual = p_norm / b_norm
    solution = tree.scale(total if d is None else tree.map(torch.mul, d, total), alpha_value)
    return SolveResult(solution, torch.tensor(spent), residual, residual <= tol, stats)


def _positive_diagonal(d: Tree, b: Tree) -> Tree:
    """``preconditioner`` checked: the structure and shapes of ``b``, entries finite and > 0."""
    tree.check_same_structure(d, b, ("preconditioner", "b"))  # also checks leaf shapes
    for x, y in zip(tree.leaves(d), tree.leaves(b)):
        if not isinstance(x, torch.Tensor) or x.device != y.device:
            raise ValueError(
                f"`preconditioner` leaves must be tensors on `b`'s device {y.device}, got "
                f"{getattr(x, 'device', type(x).__name__)}"
            )
        if not bool(torch.isfinite(x).all()) or not bool((x > 0).all()):
            raise ValueError(
                f"`preconditioner` entries must be finite and > 0, got min {float(x.min()):.3g}"
            )
    return tree.map(lambda x, y: x.to(dtype=y.dtype), d, b)
