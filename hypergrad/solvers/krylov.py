"""Krylov solvers beyond CG: GMRES, MINRES and CG on the normal equations.

Which one:
- ``cg``: symmetric positive definite ``H`` (a strict local minimum). Cheapest.
- ``minres``: symmetric but possibly indefinite ``H`` (non-convex inner losses, saddle points):
  minimises ``||b - H x||`` over the Krylov space with a 3-term recurrence (Paige & Saunders
  1975), one matvec per iteration.
- ``gmres``: non-symmetric operators (Jacobians of fixed-point maps ``I - dT/dx``), restarted
  every ``restart`` iterations (Saad & Schultz 1986); memory grows with ``restart``.
- ``normal_cg``: CG on ``H^T H x = H^T b`` (jaxopt's default for general systems): robust for
  any non-singular ``H`` but squares the condition number; two matvecs per iteration.
All take ``damping`` (solve ``(H + damping I) x = b``) and return :class:`SolveResult`.

Example:
    >>> import torch, hypergrad as hg
    >>> A = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)   # indefinite
    >>> res = hg.minres(lambda v: A @ v, torch.tensor([2.0, 1.0], dtype=torch.float64))
    >>> res.solution.round(decimals=8).tolist(), bool(res.converged)
    ([1.0, -1.0], True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _checks, tree
from ..tree import Tree
from ._common import SolveResult, _check_matvec_output, _validate_b
from .cg import cg

__all__ = ["gmres", "minres", "normal_cg"]

Matvec = Callable[[Tree], Tree]


def _damped(matvec: Matvec, damping: float) -> Matvec:
    if not damping:
        return matvec
    return lambda v: tree.axpy(damping, v, matvec(v))


def _common(matvec: Matvec, b: Tree, maxiter: int, tol: float, damping: float):
    _checks.callable_(matvec, "matvec")
    ref = _validate_b(b)
    maxiter = _checks.nonneg_int(maxiter, "maxiter")
    tol = _checks.nonneg_number(tol, "tol")
    damping = _checks.nonneg_number(damping, "damping")
    return ref, maxiter, tol, _damped(matvec, damping)


def _zero_result(b: Tree, ref: torch.Tensor) -> SolveResult:
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    return SolveResult(tree.zeros_like(b), torch.tensor(0), zero, torch.tensor(True), {})


def minres(
    matvec: Matvec, b: Tree, *, maxiter: int = 100, tol: float = 1e-6, damping: float = 0.0
) -> SolveResult:
    """MINRES for symmetric (possibly indefinite) ``H``. ``residual_norm`` is the recurrence's
    estimate ``phibar / ||b||`` (exact in exact arithmetic)."""
    ref, maxiter, tol, A = _common(matvec, b, maxiter, tol, damping)
    beta1 = tree.norm(b)
    if float(beta1) == 0:
        return _zero_result(b, ref)
    eps = torch.finfo(beta1.dtype).eps
    # Lanczos vectors r1, r2 and the QR factorisation of the tridiagonal by Givens rotations
    # (Paige & Saunders 1975; the unpreconditioned form of scipy.sparse.linalg.minres).
    x = tree.zeros_like(b)
    r1 = r2 = y = b
    w = w2 = tree.zeros_like(b)
    beta, oldb = beta1, torch.zeros_like(beta1)
    dbar = epsln = torch.zeros_like(beta1)
    phibar = beta1
    cs, sn = -torch.ones_like(beta1), torch.zeros_like(beta1)
    it = 0
    for it in range(1, maxiter + 1):
        v = tree.scale(y, 1.0 / beta)
        y = A(v)
        if it == 1:
            _check_matvec_output(y, b)
        if it >= 2:
            y = tree.axpy(-(beta / oldb), r1, y)
        alfa = tree.vdot(v, y)
        y = tree.axpy(-(alfa / beta), r2, y)
        r1, r2 = r2, y
        oldb, beta = beta, tree.norm(y)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.clamp(torch.sqrt(gbar**2 + beta**2), min=eps)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = tree.scale(tree.axpy(-delta, w2, tree.axpy(-oldeps, w1, v)), 1.0 / gamma)
        x = tree.axpy(phi, w, x)
        if bool(phibar <= tol * beta1) or float(beta) == 0.0:
            break
    residual = phibar / beta1
    return SolveResult(x, torch.tensor(it), residual, residual <= tol, {})


def gmres(
    matvec: Matvec,
    b: Tree,
    *,
    maxiter: int = 100,
    restart: int = 20,
    tol: float = 1e-6,
    damping: float = 0.0,
) -> SolveResult:
    """Restarted GMRES(``restart``) for general (non-symmetric) ``H``; at most ``maxiter``
    matvecs. Arnoldi with modified Gram-Schmidt; the small least-squares problem
    ``min_y ||beta e1 - H_m y||`` is solved directly at every step (its residual is the
    GMRES residual)."""
    ref, maxiter, tol, A = _common(matvec, b, maxiter, tol, damping)
    restart = _checks.positive_int(restart, "restart")
    b_norm = tree.norm(b)
    if float(b_norm) == 0:
        return _zero_result(b, ref)
    x = tree.zeros_like(b)
    r, beta = b, b_norm
    spent = 0
    residual = torch.ones((), dtype=b_norm.dtype)
    while spent < maxiter and bool(beta > tol * b_norm):
        V = [tree.scale(r, 1.0 / beta)]
        Hm = torch.zeros(restart + 1, restart, dtype=b_norm.dtype, device=b_norm.device)
        y = None
        breakdown = False
        for j in range(min(restart, maxiter - spent)):
            wv = A(V[j])
            if spent == 0:
                _check_matvec_output(wv, b)
            spent += 1
            for i in range(j + 1):
                Hm[i, j] = tree.vdot(wv, V[i])
                wv = tree.axpy(-Hm[i, j], V[i], wv)
            Hm[j + 1, j] = tree.norm(wv)
            e1 = torch.zeros(j + 2, dtype=b_norm.dtype, device=b_norm.device)
            e1[0] = beta
            y = torch.linalg.lstsq(Hm[: j + 2, : j + 1], e1.unsqueeze(1)).solution.squeeze(1)
            res_norm = torch.linalg.vector_norm(e1 - Hm[: j + 2, : j + 1] @ y)
            residual = res_norm / b_norm
            breakdown = float(Hm[j + 1, j]) <= 1e-12 * float(beta)
            if bool(res_norm <= tol * b_norm) or breakdown:
                break
            V.append(tree.scale(wv, 1.0 / Hm[j + 1, j]))
        for yi, vi in zip(y, V):
            x = tree.axpy(yi, vi, x)
        # A (happy) breakdown means the Krylov space is invariant: x is exact up to rounding,
        # and restarting from a rounding-level residual would only amplify noise.
        if spent >= maxiter or bool(residual <= tol) or breakdown:
            break
        r = tree.sub(b, A(x))  # true residual at the restart (one matvec)
        spent += 1
        beta = tree.norm(r)
        residual = beta / b_norm
    return SolveResult(x, torch.tensor(spent), residual, residual <= tol, {})


def normal_cg(
    matvec: Matvec,
    b: Tree,
    *,
    rmatvec: Matvec | None = None,
    maxiter: int = 100,
    tol: float = 1e-6,
    damping: float = 0.0,
) -> SolveResult:
    """CG on the normal equations ``A^T A x = A^T b`` with ``A = H + damping I``.

    ``rmatvec(v) = A^T v`` defaults to ``matvec`` (symmetric ``H``, the Hessian case).
    ``residual_norm`` is the true ``||b - A x|| / ||b||`` (one extra matvec).
    """
    ref, maxiter, tol, A = _common(matvec, b, maxiter, tol, damping)
    if rmatvec is None:
        At = A
    else:
        _checks.callable_(rmatvec, "rmatvec")
        At = _damped(rmatvec, damping)
    if float(tree.norm(b)) == 0:
        return _zero_result(b, ref)
    rhs = At(b)
    # the inner CG's tolerance is on the normal equations; the reported one is on A x = b
    inner = cg(lambda v: At(A(v)), rhs, maxiter=maxiter, tol=tol * 1e-2)
    x = inner.solution
    residual = tree.norm(tree.sub(b, A(x))) / tree.norm(b)
    return SolveResult(
        x, 2 * inner.iterations + 2, residual, residual <= tol,
        {"normal_residual_norm": inner.residual_norm},
    )
