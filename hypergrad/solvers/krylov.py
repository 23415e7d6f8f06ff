"""Krylov solvers beyond CG: GMRES, MINRES and CG on the normal equations.

Which one:
- ``cg``: symmetric positive definite ``H`` (a strict local minimum). Cheapest.
- ``minres``: symmetric but possibly indefinite ``H`` (non-convex inner losses, saddle points):
  minimises ``||b - H x||`` over the Krylov space with a 3-term recurrence (Paige & Saunders
  1975), one matvec per iteration. It reports the same curvature keys as ``cg``, so switching
  to it does not hide an indefinite Hessian.
- ``gmres``: non-symmetric operators (Jacobians of fixed-point maps ``I - dT/dx``), restarted
  every ``restart`` iterations (Saad & Schultz 1986); memory grows with ``restart``.
- ``normal_cg``: CG on ``H^T H x = H^T b`` (jaxopt's default for general systems): robust for
  any non-singular ``H`` but squares the condition number; two matvecs per iteration.
All take ``damping`` (solve ``(H + damping I) x = b``), ``tol=None`` (:func:`default_tol` of
``b``'s dtype) and return :class:`SolveResult` with the true residual (see ``cg``).

Example:
    >>> import torch, hypergrad as hg
    >>> A = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)   # indefinite
    >>> res = hg.minres(lambda v: A @ v, torch.tensor([2.0, 1.0], dtype=torch.float64))
    >>> res.solution.round(decimals=8).tolist(), bool(res.converged)
    ([1.0, -1.0], True)
    >>> bool(res.stats["nonpositive_curvature"]), round(float(res.stats["min_rayleigh"]), 8)
    (True, -1.0)
"""

from __future__ import annotations

import math

import torch

from .. import _checks, tree
from ..tree import Tree
from ._common import (
    _GAP_SAFETY,
    Matvec,
    SolveResult,
    _checked_once,
    _count,
    _damped,
    _host,
    _needs_true_residual,
    _relative,
    _scalar,
    _stagnated,
    _true_residual,
    _validate,
    _where,
)
from .cg import _cg, _raise_nonfinite

__all__ = ["gmres", "minres", "normal_cg"]


def _common(matvec: Matvec, b: Tree, maxiter: int, tol: float | None, damping: float,
            x0: Tree | None = None) -> tuple[int, float, Matvec]:
    """The entry checks; ``maxiter``, the resolved ``tol`` and ``A = H + damping I``."""
    maxiter, tol, damping = _validate(matvec, b, maxiter, tol, damping, x0)
    return maxiter, tol, _damped(_checked_once(matvec, b), damping)


def _start(A: Matvec, b: Tree, x0: Tree | None):
    """``(x, r, spent, b_norm, x0 is non-finite)`` at the start: ``r = b - A x0``."""
    b_norm = torch.sqrt(tree.vdot(b, b))
    if x0 is None:
        return tree.zeros_like(b), b, 0, b_norm, torch.zeros((), dtype=torch.bool,
                                                             device=b_norm.device)
    return x0, tree.sub(b, A(x0)), 1, b_norm, ~torch.isfinite(tree.vdot(x0, x0))


def _breakdown_scale(b: Tree, u: float) -> float:
    """A Krylov vector of norm <= this times ||A|| is rounding noise: the space is invariant.
    The noise of one matvec on a unit vector is ~ u ||A||_F <= u sqrt(n) ||A||; 10x that."""
    return 10.0 * math.sqrt(tree.numel(b)) * u


def minres(
    matvec: Matvec,
    b: Tree,
    *,
    x0: Tree | None = None,
    maxiter: int = 100,
    tol: float | None = None,
    damping: float = 0.0,
) -> SolveResult:
    """MINRES for ``(H + damping I) x = b`` with symmetric, possibly indefinite or singular, ``H``.

    Minimises ``||b - A x||`` over the Krylov space (Paige & Saunders 1975; the
    unpreconditioned form of scipy's ``minres``). Stops at ``residual <= tol``, after
    ``maxiter`` iterations, when the Lanczos process breaks down (the Krylov space is invariant),
    or at its attainable accuracy. On a singular inconsistent system (``b`` has a part outside
    the range of ``A``, or ``A = 0``) plain MINRES lets ``x`` explode along the null space
    once the least-squares residual is reached (by 1e15 and more, with a residual estimate
    that no longer means anything). Here a step is refused, and the solve stops, when it lowers
    the residual by less than 2x while its own rounding (which grows with ``||x||``) exceeds
    10% of the residual, or at a breakdown with a singular tridiagonal; and the solve stops once
    the accumulated rounding bound exceeds the residual estimate. The result is then the
    least-squares residual, reported, with ``converged=False`` and ``stats["stagnated"]``.

    ``residual_norm`` is the true relative residual: MINRES's own estimate ``phibar`` is used
    only when its rounding bound certifies it to 10%, otherwise one more matvec computes it
    (``stats["residual_checked"]``). MINRES needs a symmetric ``A``; a free test per step
    (``v_{k-1}^T A v_k = beta_k``) sets ``stats["nonsymmetric"]`` otherwise, and then the
    residual is always checked. ``stats`` has cg's curvature keys: ``min_rayleigh`` /
    ``max_rayleigh`` are the extreme Ritz values (eigenvalues of the Lanczos tridiagonal,
    Rayleigh quotients of ``A`` over the Krylov space, computed on the host from values the
    stopping reads already brought back) and ``nonpositive_curvature`` is ``min_rayleigh <= 0``,
    a certificate that ``A`` is not positive definite. ``iterations`` counts matvecs: one for
    ``x0`` (if given), one per Lanczos step, one if the residual was checked.
    """
    maxiter, tol, A = _common(matvec, b, maxiter, tol, damping, x0)
    x, r0, spent, b_norm, x0_bad = _start(A, b, x0)
    beta1 = torch.sqrt(tree.vdot(r0, r0))
    dtype, device = beta1.dtype, beta1.device
    u = torch.finfo(dtype).eps / 2
    brk = _breakdown_scale(b, u)
    zero = torch.zeros((), dtype=dtype, device=device)
    # Lanczos vectors r1, r2 and the QR factorisation of the tridiagonal by Givens rotations.
    r1 = r2 = y = r0
    w = w2 = tree.zeros_like(b)
    w_norm = w2_norm = zero
    beta, oldb = beta1, zero
    dbar = epsln = zero
    phibar = beta1
    cs, sn = -torch.ones_like(beta1), zero
    tnorm2 = zero
    stop = phibar <= tol * b_norm
    x_sum, r_sum = zero, zero  # r0 is a true residual: no gap yet
    alfa = zero
    v = None
    asym = stuck = torch.zeros((), dtype=torch.bool, device=device)
    sqrt_eps = (2 * u) ** 0.5
    history = [beta1]
    alfas: list[float] = []
    betas: list[float] = []
    it = 0
    while True:
        tnorm = torch.sqrt(tnorm2)
        gap = u * (tnorm * x_sum + r_sum)
        need = _needs_true_residual(gap, phibar, b_norm, tol)
        flags = [stop, need | asym, alfa, beta, asym]
        if it == 0:
            flags += [~torch.isfinite(b_norm), x0_bad]
        got = _host(flags)  # the one host read of this iteration
        if it == 0:
            _raise_nonfinite(got[5], got[6])
        else:
            alfas.append(got[2])
            betas.append(got[3])
        if got[0] or it == maxiter:
            break
        it += 1
        v_prev, v = v, tree.scale(y, 1.0 / beta)
        y = A(v)
        if it >= 2:
            # symmetric A: v_prev^T A v = beta (to rounding); MINRES's residual needs it
            asym = asym | ((tree.vdot(v_prev, y) - beta).abs() > sqrt_eps * torch.sqrt(tnorm2))
            y = tree.axpy(-(beta / oldb), r1, y)
        alfa = tree.vdot(v, y)
        y = tree.axpy(-(alfa / beta), r2, y)
        r1, r2 = r2, y
        oldb, beta = beta, torch.sqrt(tree.vdot(y, y))
        tnorm2 = tnorm2 + alfa**2 + oldb**2 + beta**2
        tnorm = torch.sqrt(tnorm2)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar**2 + beta**2)
        # the Krylov space is invariant (to rounding): stop after this step; if T is also
        # singular there (gamma at rounding level: b has a part outside A's range, or A = 0),
        # take no step: it would be rounding noise times 1 / gamma
        breakdown = beta <= brk * tnorm
        singular = gamma <= brk * tnorm
        gamma_safe = torch.where(singular, 1.0, gamma)
        cs = torch.where(singular, 0.0, gbar / gamma_safe)
        sn = torch.where(singular, 1.0, beta / gamma_safe)
        phi = cs * phibar
        phibar_new = sn * phibar
        w1, w2, w2_norm = w2, w, w_norm
        w = tree.scale(tree.axpy(-delta, w2, tree.axpy(-oldeps, w1, v)), 1.0 / gamma_safe)
        w_norm_new = torch.sqrt(tree.vdot(w, w))
        w1_norm, w_norm = w2_norm, w_norm_new
        x_try = tree.axpy(phi, w, x)
        # rounding added by this step: x += phi w, w's recurrence, the Lanczos relation
        dx_sum = torch.sqrt(tree.vdot(x_try, x_try)) + phi.abs() * (
            w_norm + (1.0 + delta.abs() * w2_norm + oldeps.abs() * w1_norm) / gamma_safe)
        d_gap = u * (tnorm * dx_sum + phibar_new + beta)
        # A step that barely lowers phibar (< 2x) while its own rounding is more than 10% of
        # the residual is noise (the near-null directions of a singular or inconsistent system:
        # x jumps by ~1/eps): refuse it and stop, the minimum residual is reached.
        reject = (_GAP_SAFETY * d_gap > 0.1 * phibar_new) & (phibar_new > 0.5 * phibar)
        x = _where(reject, x, x_try)
        phibar = torch.where(reject, phibar, phibar_new)
        x_sum = x_sum + torch.where(reject, 0.0, dx_sum)
        r_sum = r_sum + torch.where(reject, 0.0, phibar_new + beta)
        history.append(phibar)
        stuck = stuck | reject | (singular & ~(phibar <= tol * b_norm))
        stop = (phibar <= tol * b_norm) | breakdown | reject
        # attainable accuracy: once the rounding bound (growing with ||x||) exceeds phibar
        # itself, further steps are not trusted to lower the true residual (in the
        # least-squares regime of an inconsistent system they make it grow)
        stop = stop | (u * (tnorm * x_sum + r_sum) > phibar)
    checked = bool(got[1])
    estimate = _relative(phibar, b_norm)
    residual = _true_residual(A, b, x, b_norm) if checked else estimate
    converged = residual <= tol
    if got[4]:  # not symmetric: T is no projection of A; the Lanczos vectors' quotients are
        min_ray, max_ray = _scalar(min(alfas), zero), _scalar(max(alfas), zero)
    else:
        min_ray, max_ray = _ritz_extremes(alfas, betas, dtype, device)
    return SolveResult(
        x,
        _count(spent + it + int(checked), zero),
        residual,
        converged,
        {
            "residual_estimate": False,
            "residual_checked": checked,
            "nonpositive_curvature": min_ray <= 0,
            "min_rayleigh": min_ray,
            "max_rayleigh": max_ray,
            "stagnated": _stagnated(history, converged,
                                    ((estimate <= tol) & ~converged) | stuck),
            "nonsymmetric": bool(got[4]),
        },
    )


def _ritz_extremes(alfas: list[float], betas: list[float], dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Extreme eigenvalues of the k x k Lanczos tridiagonal (diagonal ``alfas``, off-diagonal
    ``betas[:-1]``), computed on the host from the values the stopping reads brought back."""
    if not alfas:
        return (torch.full((), float("inf"), dtype=dtype, device=device),
                torch.zeros((), dtype=dtype, device=device))
    k = len(alfas)
    T = torch.diag(torch.tensor(alfas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    if not all(math.isfinite(t) for t in alfas + betas[: k - 1]):
        nan = torch.full((), float("nan"), dtype=dtype, device=device)
        return nan, nan
    ev = torch.linalg.eigvalsh(T).to(dtype=dtype, device=device)  # a host LAPACK call
    return ev[0], ev[-1]


def gmres(
    matvec: Matvec,
    b: Tree,
    *,
    x0: Tree | None = None,
    maxiter: int = 100,
    restart: int = 20,
    tol: float | None = None,
    damping: float = 0.0,
) -> SolveResult:
    """Restarted GMRES(``restart``) for general (non-symmetric) ``A = H + damping I``.

    Arnoldi with modified Gram-Schmidt; the small least-squares problem
    ``min_y ||beta e1 - H_m y||`` is solved directly at every step (its residual is the GMRES
    residual). At a restart the true residual ``b - A x`` is computed (one matvec). The final
    residual is the least-squares one when its rounding bound certifies it to 10%, otherwise
    one more matvec computes the true one (``stats["residual_checked"]``). ``iterations``
    counts all matvecs (``x0``, Arnoldi steps, restarts, the check); at most ``maxiter`` before
    the check.
    """
    maxiter, tol, A = _common(matvec, b, maxiter, tol, damping, x0)
    restart = _checks.positive_int(restart, "restart")
    x, r, spent, b_norm, x0_bad = _start(A, b, x0)
    dtype, device = b_norm.dtype, b_norm.device
    u = torch.finfo(dtype).eps / 2
    brk = _breakdown_scale(b, u)
    zero = torch.zeros((), dtype=dtype, device=device)
    beta = torch.sqrt(tree.vdot(r, r))
    estimate = _relative(beta, b_norm)
    history = [beta]
    stop = beta <= tol * b_norm
    a_est = zero
    V: list[Tree] = []
    none = torch.zeros(0, dtype=dtype, device=device)  # no Arnoldi step yet: no coefficients
    y = none  # x = x_start + sum_i y_i V_i
    j = 0  # Arnoldi steps in the current cycle
    x_start, r_start = x, beta
    Hm = torch.zeros(restart + 1, restart, dtype=dtype, device=device)
    first = True
    while True:
        if j:
            y_l1 = y.abs().sum()
            gap = u * (a_est * (torch.sqrt(tree.vdot(x_start, x_start)) + (j + 1) * y_l1)
                       + r_start + b_norm)
            need = _needs_true_residual(gap, estimate * b_norm, b_norm, tol)
        else:  # the residual is the true one, computed at the start or at a restart
            need = torch.zeros((), dtype=torch.bool, device=device)
        flags = [stop, need]
        if first:
            flags += [~torch.isfinite(b_norm), x0_bad]
        got = _host(flags)  # the one host read of this step
        if first:
            _raise_nonfinite(got[2], got[3])
            first = False
        if got[0] or spent >= maxiter or j == restart:
            if j:
                for yi, vi in zip(y, V):
                    x = tree.axpy(yi, vi, x)
            if got[0] or spent >= maxiter:
                break
            r = tree.sub(b, A(x))  # restart from the true residual (one matvec)
            spent += 1
            beta = torch.sqrt(tree.vdot(r, r))
            estimate = _relative(beta, b_norm)
            history.append(beta)
            stop = beta <= tol * b_norm
            j, V, y, x_start, r_start = 0, [], none, x, beta
            Hm = torch.zeros(restart + 1, restart, dtype=dtype, device=device)
            continue
        if j == 0:
            V = [tree.scale(r, 1.0 / torch.where(beta > 0, beta, 1.0))]
        wv = A(V[j])
        spent += 1
        for i in range(j + 1):
            h = tree.vdot(wv, V[i])
            Hm[i, j] = h
            wv = tree.axpy(-h, V[i], wv)
        h_next = torch.sqrt(tree.vdot(wv, wv))
        Hm[j + 1, j] = h_next
        a_est = torch.maximum(a_est, torch.linalg.vector_norm(Hm[: j + 2, j]))
        e1 = torch.zeros(j + 2, dtype=dtype, device=device)
        e1[0] = beta
        sub = Hm[: j + 2, : j + 1]
        y = torch.linalg.lstsq(sub, e1.unsqueeze(1)).solution.squeeze(1)
        res_norm = torch.linalg.vector_norm(e1 - sub @ y)
        estimate = _relative(res_norm, b_norm)
        history.append(res_norm)
        # a (happy) breakdown: the Krylov space is invariant, x is as good as it gets
        breakdown = h_next <= brk * a_est
        stop = (res_norm <= tol * b_norm) | breakdown
        V.append(tree.scale(wv, 1.0 / torch.where(h_next > 0, h_next, 1.0)))
        j += 1
    checked = bool(got[1])
    residual = _true_residual(A, b, x, b_norm) if checked else estimate
    converged = residual <= tol
    return SolveResult(
        x,
        _count(spent + int(checked), b_norm),
        residual,
        converged,
        {
            "residual_estimate": False,
            "residual_checked": checked,
            "stagnated": _stagnated(history, converged, (estimate <= tol) & ~converged),
        },
    )


def normal_cg(
    matvec: Matvec,
    b: Tree,
    *,
    rmatvec: Matvec | None = None,
    maxiter: int = 100,
    tol: float | None = None,
    damping: float = 0.0,
) -> SolveResult:
    """CG on the normal equations ``A^T A x = A^T b`` with ``A = H + damping I``.

    ``rmatvec(v) = A^T v`` defaults to ``matvec`` (symmetric ``H``, the Hessian case).
    ``residual_norm`` is the true ``||b - A x|| / ||b||`` (one extra matvec); ``iterations``
    counts all matvecs (two per CG step, one for ``A^T b``, one for the residual).
    """
    maxiter, tol, A = _common(matvec, b, maxiter, tol, damping)
    if rmatvec is None:
        At = A
    else:
        _checks.callable_(rmatvec, "rmatvec")
        At = _damped(_checked_once(rmatvec, b, "rmatvec"), damping)
    rhs = At(b)
    # the inner CG's tolerance is on the normal equations; the reported one is on A x = b
    inner = _cg(lambda v: At(A(v)), rhs, None, maxiter, tol * 1e-2, 1)
    assert inner.stats is not None  # _cg always reports its stats
    x = inner.solution
    residual = _true_residual(A, b, x, torch.sqrt(tree.vdot(b, b)))
    return SolveResult(
        x, 2 * inner.iterations + 2, residual, residual <= tol,
        {"residual_estimate": False, "normal_residual_norm": inner.residual_norm,
         "stagnated": inner.stats["stagnated"] & ~(residual <= tol)},
    )
