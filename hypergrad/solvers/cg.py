"""Conjugate gradient for symmetric positive-definite systems (the default IFT solver).

Example:
    >>> import torch, hypergrad as hg
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> res = hg.cg(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> bool(res.converged), res.stats["residual_estimate"], res.stats["residual_checked"]
    (True, False, True)
    >>> int(res.iterations)   # 2 steps, then 1 product: the residual is at rounding level
    3
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _checks, tree
from ..tree import Tree
from ._common import (
    Matvec,
    SolveResult,
    _checked_once,
    _count,
    _damped,
    _flat_matvec,
    _host,
    _needs_true_residual,
    _ravelable,
    _relative,
    _stagnated,
    _true_residual,
    _validate,
    _zero_unless,
)

__all__ = ["cg"]


def cg(
    matvec: Matvec,
    b: Tree,
    *,
    x0: Tree | None = None,
    maxiter: int = 100,
    tol: float | None = None,
    damping: float = 0.0,
    check_every: int = 1,
) -> SolveResult:
    """Conjugate gradient for ``(H + damping I) x = b`` with ``H`` symmetric positive definite.

    The recurrences (Hestenes & Stiefel 1952; Nocedal & Wright Alg. 5.2), ``A = H + damping I``:
        alpha_k = r_k^T r_k / p_k^T A p_k,
        x_{k+1} = x_k + alpha_k p_k,  r_{k+1} = r_k - alpha_k A p_k,
        beta_k = r_{k+1}^T r_{k+1} / r_k^T r_k,  p_{k+1} = r_{k+1} + beta_k p_k.

    Stops when ``||r|| <= tol ||b||`` (``tol=None``: :func:`default_tol` of ``b``'s dtype) or
    after ``maxiter`` iterations. If a search direction has non-positive curvature
    (``p^T A p <= 0``: ``A`` is not positive definite, e.g. not at a minimum) CG stops before
    that step and sets ``stats["nonpositive_curvature"]``.

    The residual is the true one: the recurrence's ``r`` drifts from ``b - A x`` by rounding
    (badly on singular or ill-conditioned systems, where ``x`` grows); CG tracks a rounding
    bound of that gap (van der Vorst & Ye 2000) and, only when the bound cannot certify the
    reported residual to 10% (or a claim of convergence), spends one more matvec on the true
    residual (``stats["residual_checked"]``). A well-conditioned solve pays nothing.

    ``iterations`` counts the matvecs behind the result: one for ``x0`` (if given), one per CG
    step taken, one if the true residual was checked. ``check_every=k`` reads the stopping
    test from the device every ``k`` steps (one host synchronisation per read, see the package
    docstring); steps after convergence inside a block are masked (no effect on ``x``), so the
    result equals stopping exactly, but up to ``k - 1`` extra matvecs may be spent
    (``stats["matvecs"]``: all matvecs called). ``x0`` warm-starts the iteration.
    A non-finite ``b`` or ``x0`` raises a ValueError at the first read.
    """
    maxiter, tol, damping = _validate(matvec, b, maxiter, tol, damping, x0)
    check_every = _checks.positive_int(check_every, "check_every")
    if _ravelable(b):
        # One flat vector: every vector operation below is one torch op instead of one per
        # leaf (measured: CG's bookkeeping 1.35 -> 1.08 ms per iteration on an MLP pytree).
        bv, unravel = tree.ravel(b)
        res = _cg(_damped(_flat_matvec(matvec, b, unravel), damping), bv,
                  None if x0 is None else tree.ravel(x0)[0], maxiter, tol, check_every)
        return res._replace(solution=unravel(res.solution))
    return _cg(_damped(_checked_once(matvec, b), damping), b, x0, maxiter, tol, check_every)


def _cg(A: Callable[[Tree], Tree], b: Tree, x0: Tree | None, maxiter: int, tol: float,
        every: int) -> SolveResult:
    """CG on validated inputs; ``A`` already includes damping."""
    vdot, axpy, zero_unless = _vector_ops(b)
    b2 = vdot(b, b)
    b_norm = torch.sqrt(b2)  # the same sum as rs below, so the residual of x = 0 is exactly 1
    dtype, device = b2.dtype, b2.device
    u = torch.finfo(dtype).eps / 2
    zero = torch.zeros((), dtype=dtype, device=device)
    if x0 is None:
        x, r, rs, pre = tree.zeros_like(b), b, b2, 0
        x_sum, r_sum = zero, zero
        x0_bad = torch.zeros((), dtype=torch.bool, device=device)
    else:
        x, r, pre = x0, tree.sub(b, A(x0)), 1
        rs = vdot(r, r)
        x0_bad = ~torch.isfinite(vdot(x0, x0))
        x_sum, r_sum = zero, zero  # r0 = b - A x0 is a true residual: no gap yet
    thr = tol**2 * b2
    p = r
    done = rs <= thr
    bad = torch.zeros((), dtype=torch.bool, device=device)
    min_ray = torch.full((), float("inf"), dtype=dtype, device=device)
    max_ray = a_est = zero
    active = torch.zeros((), dtype=torch.int64, device=device)
    history = [torch.sqrt(rs)]
    spent = 0
    first = True
    while True:
        if spent % every == 0 or spent == maxiter:
            gap = u * (a_est * x_sum + r_sum)
            need = _needs_true_residual(gap, torch.sqrt(rs), b_norm, tol)
            flags = [done, need, active if every > 1 else spent]
            if first:
                flags += [~torch.isfinite(b2), x0_bad]
            got = _host(flags)  # the one host read of this stopping test
            if first:
                _raise_nonfinite(got[3], got[4])
                first = False
            if got[0] or spent == maxiter:
                break
        ap = A(p)
        spent += 1
        pap = vdot(p, ap)
        pp = vdot(p, p)
        live = ~done
        curv_ok = (pap > 0) & torch.isfinite(pap)
        ok = live & curv_ok
        bad = bad | (live & ~curv_ok)
        ray = pap / pp
        seen = live & torch.isfinite(ray)
        min_ray = torch.where(seen, torch.minimum(min_ray, ray), min_ray)
        max_ray = torch.where(seen, torch.maximum(max_ray, ray), max_ray)
        a_est = torch.where(seen, torch.maximum(a_est, ray.abs()), a_est)  # ~ ||A||
        step = torch.where(ok, rs / torch.where(ok, pap, 1.0), 0.0)
        ap = zero_unless(ok, ap)  # a NaN product must not reach r
        x = axpy(step, p, x)
        r = axpy(-step, ap, r)
        rs_new = vdot(r, r)
        p = axpy(torch.where(ok, rs_new / rs, 0.0), p, r)
        rs = rs_new
        done = done | bad | (rs <= thr)
        active = active + live.to(torch.int64)
        history.append(torch.sqrt(rs))
        x_sum = x_sum + torch.where(ok, torch.sqrt(vdot(x, x)) + step.abs() * torch.sqrt(pp), 0.0)
        r_sum = r_sum + torch.where(ok, torch.sqrt(rs), 0.0)
    steps = int(got[2])
    recurrence = _relative(torch.sqrt(rs), b_norm)
    checked = bool(got[1])
    residual = _true_residual(A, b, x, b_norm, vdot) if checked else recurrence
    converged = residual <= tol
    floor_hit = (recurrence <= tol) & ~converged
    return SolveResult(
        x,
        _count(pre + steps + int(checked), b_norm),
        residual,
        converged,
        {
            "residual_estimate": False,
            "residual_checked": checked,
            "nonpositive_curvature": bad,
            "min_rayleigh": min_ray,
            "max_rayleigh": max_ray,
            "stagnated": _stagnated(history[: steps + 1], converged, floor_hit),
            "matvecs": pre + spent + int(checked),
        },
    )


def _vector_ops(b: Tree):
    """``vdot``, ``axpy`` and ``zero_unless`` for ``b``: plain torch calls on one tensor (the
    ravelled common case: no pytree bookkeeping per operation), pytree versions otherwise."""
    if isinstance(b, torch.Tensor):
        return (lambda a, c: torch.vdot(a.reshape(-1), c.reshape(-1)),
                lambda alpha, x, y: torch.addcmul(y, x, alpha),
                lambda mask, a: torch.where(mask, a, 0.0))
    return tree.vdot, tree.axpy, _zero_unless


def _raise_nonfinite(b_bad: float, x0_bad: float) -> None:
    if b_bad:
        raise ValueError("`b` contains NaN or inf (or its norm overflows); a solve of H x = b "
                         "needs a finite right-hand side: check the outer gradient")
    if x0_bad:
        raise ValueError("`x0` contains NaN or inf; pass a finite warm start or x0=None")
