"""What every solver shares: the ``SolveResult`` contract, the default tolerance per dtype, the
checks on ``b`` and ``matvec``, the one host read per stopping test, and the rounding bound that
decides when a Krylov solver pays one matvec for its true residual.

Every solver has the signature ``solver(matvec, b, **options) -> SolveResult`` and never raises
on non-convergence: the result says how it went (``converged``, ``residual_norm``,
``iterations``) and callers decide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from .. import _checks, tree
from ..tree import Tree

__all__ = ["SolveResult", "Matvec", "default_tol"]

Matvec = Callable[[Tree], Tree]


class SolveResult(NamedTuple):
    """What a solve produced and how it went.

    solution: the approximate ``x`` (a pytree like ``b``).
    iterations: matrix-vector products spent on the result (0-dim int64 tensor on ``b``'s
        device, like every tensor of the result; ``int(...)`` of it is a device read on a GPU);
        each solver's docstring says exactly what it counts.
    residual_norm: ``||b - (H + damping I) x|| / ||b||`` of the returned solution (0-dim tensor;
        0 for ``b = 0``; inf if the iteration blew up, nan if ``b`` holds NaN/inf), to within
        10% or rounding, unless ``stats["residual_estimate"]`` is True.
    converged: ``residual_norm <= tol`` (0-dim bool tensor). Never True when the true residual
        exceeds ``tol`` by more than rounding, unless ``stats["residual_estimate"]`` is True.
    stats: diagnostics; the keys every solver or a family shares:

        - ``residual_estimate`` (Python bool, every solver): True when ``residual_norm`` (and so
          ``converged``) is an estimate rather than the true relative residual: Neumann's free
          residual of its (J-1)-term partial sum. False everywhere else.
        - ``nonpositive_curvature`` (0-dim bool tensor; cg, minres, nystrom, neumann with
          ``alpha="auto"``): a certificate that ``H + damping I`` is not positive definite: a
          vector ``v`` with ``v^T (H + damping I) v <= 0`` was met (cg: a search direction;
          minres: a vector of the Krylov space, the smallest Ritz value of its Lanczos
          tridiagonal; nystrom: of the sketch's span; neumann: the power iteration's estimate).
        - ``min_rayleigh``, ``max_rayleigh`` (0-dim tensors; cg, minres): the smallest and
          largest Rayleigh quotient ``v^T A v / v^T v`` (``A = H + damping I``) over the vectors
          the solver formed (cg: its search directions; minres: Ritz values, the extreme
          Rayleigh quotients over its Krylov space). Both lie in ``[lambda_min, lambda_max]``
          of a symmetric ``A``: a small positive ``min_rayleigh`` is a measured lower bound on
          how ill-conditioned ``A`` is, and a size for ``damping``. (``inf``/``0`` when no
          product was taken.)
        - ``stagnated`` (0-dim bool tensor; cg, minres, gmres, normal_cg): not converged, and
          the residual stopped decreasing: after at least 10 iterations, the best residual of
          the second half of the run is above ``2^(-w/10)`` times the best of the first half
          (``w`` the second half's length: slower than 2x per 10 iterations, CG's worst-case
          rate at cond ~ 850, or no progress: a singular or ill-conditioned system), or the
          solver's own residual reached ``tol`` while the true residual did not (the rounding
          floor of the method, i.e. its attainable accuracy), or (minres) it stopped at the
          minimum residual of an inconsistent system. More iterations will not help much;
          damping or preconditioning will. Computed from values already on the device: no
          extra host read.
        - ``residual_checked`` (Python bool; cg, minres, gmres): whether one extra matvec was
          spent to compute the true residual because the rounding bound of the recurrence could
          not certify it (see :func:`_needs_true_residual`).
        - ``alpha``, ``lambda_max`` (neumann): the step, and the power iteration's estimate.
        - ``terms`` (Python int; neumann, sama): the number ``J`` of series terms in the
          solution. With ``residual_estimate`` the residual is that of ``J - 1`` terms, so for
          ``J = 1`` it is the starting point's (1 for ``x0 = 0``): it says nothing about the
          returned solution, an approximation by design.
    """

    solution: Tree
    iterations: torch.Tensor
    residual_norm: torch.Tensor
    converged: torch.Tensor
    stats: dict[str, Any] | None = None


# The default ``tol`` of every solver, per dtype: the relative residual a solve aims for. A
# Krylov solve cannot get its true residual much below ~ u cond(H) (u the unit roundoff;
# measured for CG on random SPD matrices: 0.3-0.5 u cond), so each tolerance is set where it
# is reachable up to a stated condition number, and no tighter:
# float64 (u = 1.1e-16): 1e-10, reachable to cond ~ 1e6; a hypergradient good to ~1e-10 cond.
# float32 (u = 6.0e-8): 1e-5, reachable to cond ~ 300 (the old 1e-6 only to cond ~ 30; above
#   that CG reported convergence on its drifting recurrence while the true residual was 2-50x
#   larger).
# float16 (u = 4.9e-4) / bfloat16 (u = 3.9e-3): 1e-2, two digits; half-precision Hessian
#   products rarely carry more.
_DEFAULT_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def default_tol(dtype: torch.dtype) -> float:
    """The default relative-residual tolerance of every solver for ``b`` of ``dtype``.

    float64: 1e-10; float32: 1e-5; float16 / bfloat16: 1e-2; other floating dtypes:
    ``sqrt(eps)``. Each is reachable by a Krylov solve up to a condition number of about 1e6,
    300 and a few respectively (the attainable true residual is ~ eps cond(H) / 4). Every
    solver's ``tol=None`` resolves to this (pass ``tol=`` to override).

    Example:
        >>> import torch, hypergrad as hg
        >>> hg.default_tol(torch.float64), hg.default_tol(torch.float32)
        (1e-10, 1e-05)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`dtype` must be a floating torch.dtype, got {dtype!r}")
    if dtype in _DEFAULT_TOL:
        return _DEFAULT_TOL[dtype]
    return float(torch.finfo(dtype).eps) ** 0.5


def _count(n: int, ref: torch.Tensor) -> torch.Tensor:
    """``SolveResult.iterations``: ``n`` as a 0-dim int64 tensor on ``ref``'s device, made by a
    fill (no host-to-device copy, which on a GPU would wait for the queued kernels)."""
    return torch.full((), n, dtype=torch.int64, device=ref.device)


def _scalar(x: float, ref: torch.Tensor) -> torch.Tensor:
    """A Python number as a 0-dim tensor of ``ref``'s dtype and device, by a fill (no copy)."""
    return torch.full((), x, dtype=ref.dtype, device=ref.device)


def _resolve_tol(tol: float | None, dtype: torch.dtype) -> float:
    return default_tol(dtype) if tol is None else _checks.nonneg_number(tol, "tol")


def _validate_b(b: Tree) -> torch.Tensor:
    """``b`` is a non-empty pytree of floating tensors; its first leaf. No finiteness check
    here (that would be a host read per leaf): a non-finite ``b`` shows in the result."""
    return _checks.tensor_tree(b, "b")[0]


def _check_matvec_output(hv: Tree, b: Tree, name: str = "matvec") -> None:
    try:
        tree.check_same_structure(b, hv, names=("b", f"{name}(b)"))
    except ValueError as e:
        raise ValueError(f"`{name}` must map a pytree like `b` to one like `b`: {e}") from None


def _checked_once(matvec: Matvec, b: Tree, name: str = "matvec") -> Matvec:
    """``matvec`` whose first output is checked to be a pytree like ``b``, before any
    arithmetic on it (Python only, no host read); later calls pass straight through. ``name``
    is the argument named in the error (``rmatvec`` for normal_cg's transpose)."""
    checked: list[bool] = []

    def once(v: Tree) -> Tree:
        hv = matvec(v)
        if not checked:
            _check_matvec_output(hv, b, name)
            checked.append(True)
        return hv

    return once


def _flat_matvec(matvec: Matvec, b: Tree, unravel: Callable[[torch.Tensor], Tree]) -> Matvec:
    """``matvec`` on the ravelled vector of ``b``'s pytree (its first output checked)."""
    once = _checked_once(matvec, b)

    def flat(v: torch.Tensor) -> torch.Tensor:
        return tree.ravel(once(unravel(v)))[0]

    return flat


def _validate(matvec: Matvec, b: Tree, maxiter: int, tol: float | None, damping: float,
              x0: Tree | None) -> tuple[int, float, float]:
    """The entry checks of the Krylov solvers (cg, minres, gmres, normal_cg): ``maxiter``,
    ``tol`` resolved for ``b``'s dtype, and ``damping``."""
    _checks.callable_(matvec, "matvec")
    ref = _validate_b(b)
    maxiter = _checks.nonneg_int(maxiter, "maxiter")
    tol = _resolve_tol(tol, ref.dtype)
    damping = _checks.nonneg_number(damping, "damping")
    if x0 is not None:
        _checks.like(x0, "x0", b, "b")
    return maxiter, tol, damping


def _ravelable(b: Tree) -> bool:
    leaves = tree.leaves(b)
    return (not isinstance(b, torch.Tensor) and len(leaves) > 1
            and all(x.dtype == leaves[0].dtype and x.device == leaves[0].device for x in leaves))


def _damped(matvec: Matvec, damping: float) -> Matvec:
    if not damping:
        return matvec
    return lambda v: tree.axpy(damping, v, matvec(v))


# Selecting with a 0-dim mask, bit by bit: ``torch.where`` broadcasting a bool costs ~4
# additions per element on a CPU; an integer AND (XOR) on the same bits costs one each and is
# exact for every value, NaN and inf included (no arithmetic touches them).
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _bitmask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """All ones where ``mask`` (0-dim bool) is True, else 0, as the integer type of ``x``'s
    bits; None when ``x`` cannot be viewed so (complex, or it needs a gradient)."""
    bits = _BITS.get(x.element_size())
    if bits is None or x.is_complex() or not x.is_floating_point() or x.requires_grad:
        return None
    return mask.to(bits).neg()


def _select(mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    k = _bitmask(mask, x) if x.dtype == y.dtype and not y.requires_grad else None
    if k is None:
        return torch.where(mask, x, y)
    xi, yi = x.view(k.dtype), y.view(k.dtype)
    return torch.bitwise_xor(xi, yi).bitwise_and_(k).bitwise_xor_(yi).view(x.dtype)


def _select_into(mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`_select` written into ``x`` (a tensor the caller owns: no new tensor)."""
    k = _bitmask(mask, x) if x.dtype == y.dtype and not y.requires_grad else None
    if k is None:
        return torch.where(mask, x, y)
    xi, yi = x.view(k.dtype), y.view(k.dtype)
    xi.bitwise_xor_(yi).bitwise_and_(k).bitwise_xor_(yi)
    return x


def _zero_one(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    k = _bitmask(mask, x)
    if k is None:
        return torch.where(mask, x, 0.0)
    return torch.bitwise_and(x.view(k.dtype), k).view(x.dtype)


def _where(mask: torch.Tensor, a: Tree, b: Tree) -> Tree:
    """``a`` where the 0-dim ``mask`` is True, else ``b``, leaf-wise (no host read)."""
    return tree.map(lambda x, y: _select(mask, x, y), a, b)


def _where_into(mask: torch.Tensor, a: Tree, b: Tree) -> Tree:
    """:func:`_where` written into ``a``'s tensors, which the caller owns (fresh results of its
    own arithmetic): no new tensors (no host read)."""
    return tree.map(lambda x, y: _select_into(mask, x, y), a, b)


def _zero_unless_into(mask: torch.Tensor, a: Tree) -> Tree:
    """:func:`_zero_unless` written into ``a``'s tensors, which the caller owns; a tensor that
    cannot take a bit mask (complex, or one that needs a gradient) is replaced instead."""
    def one(x: torch.Tensor) -> torch.Tensor:
        k = _bitmask(mask, x)
        if k is None:
            return torch.where(mask, x, 0.0)
        x.view(k.dtype).bitwise_and_(k)
        return x

    return tree.map(one, a)


def _zero_unless(mask: torch.Tensor, a: Tree) -> Tree:
    """``a`` where the 0-dim ``mask`` is True, else zeros (NaN/inf do not leak through)."""
    return tree.map(lambda x: _zero_one(mask, x), a)


def _relative(r_norm: torch.Tensor, b_norm: torch.Tensor) -> torch.Tensor:
    """``r_norm / b_norm``, with 0 for ``r = b = 0`` (the exact answer ``x = 0``)."""
    return torch.where(b_norm > 0, r_norm / torch.where(b_norm > 0, b_norm, 1.0),
                       torch.where(r_norm == 0, 0.0, float("inf")).to(r_norm.dtype))


def _true_residual(A: Matvec, b: Tree, x: Tree, b_norm: torch.Tensor,
                   vdot: Callable[[Any, Any], torch.Tensor] = tree.vdot) -> torch.Tensor:
    """``||b - A x|| / ||b||``, the true relative residual of ``x`` (one matvec)."""
    rt = tree.sub(b, A(x))
    return _relative(torch.sqrt(vdot(rt, rt)), b_norm)


def _host(values: Sequence[torch.Tensor | bool | float | int]) -> list[float]:
    """The one host read of a stopping test: the tensor scalars stacked and copied in one
    transfer; Python numbers are passed through as floats (not sent to the device and back:
    a tensor made from a Python number on a GPU is a host-to-device copy per call)."""
    ts = [v for v in values if isinstance(v, torch.Tensor)]
    if not ts:
        return [float(v) for v in values]
    dt = torch.float32 if ts[0].device.type == "mps" else torch.float64
    read = iter(torch.stack([v.detach().to(dtype=dt).reshape(()) for v in ts]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


# The gap between a Krylov recurrence's residual and the true one, f = b - A x - r, grows by
# the rounding of each update (van der Vorst & Ye, SIAM J. Sci. Comput. 22, 2000, Sec. 2):
#     ||f_k|| <= u sum_j (||A|| ||x_j|| + ||r_j|| + ||A|| ||dx_j||) (times a modest constant),
# with u the unit roundoff, for a backward-stable matvec. ``_GAP_SAFETY`` is that constant:
# it covers the matvec's own rounding (an HVP is a few passes through a network) and an
# underestimate of ||A|| by the solver's Rayleigh quotients. Measured gap / bound over the
# test suite's operators stays below 0.05 (see tests/test_residuals.py).
_GAP_SAFETY = 10.0


def _needs_true_residual(gap: torch.Tensor, r_norm: torch.Tensor, b_norm: torch.Tensor,
                         tol: float) -> torch.Tensor:
    """Whether the recurrence residual ``r_norm`` cannot be trusted to 10% (or to support a
    claim of convergence) given the rounding bound ``gap`` on ``||b - A x - r||``: then the
    solver spends one matvec on the true residual. 0-dim bool tensor, no host read."""
    g = _GAP_SAFETY * gap
    claims = r_norm <= tol * b_norm
    return (g > 0.1 * r_norm) | (claims & (r_norm + g > tol * b_norm))


def _stagnated(history: list[torch.Tensor], converged: torch.Tensor,
               floor_hit: torch.Tensor) -> torch.Tensor:
    """``stats["stagnated"]`` from the residual norms after each iteration (``history[0]`` the
    initial one): not converged and either (at least 10 iterations) the best residual of the
    last ``w = m - m // 2`` iterations is above ``2^(-w/10)`` times the best before them (a
    rate slower than 2x per 10 iterations: CG's worst-case rate at cond ~ 850, or no progress
    at all), or ``floor_hit``."""
    m = len(history) - 1
    if m >= 10:
        h = torch.stack(history)
        half = m // 2
        slow = h[half + 1:].min() > 0.5 ** ((m - half) / 10) * h[: half + 1].min()
    else:
        slow = torch.zeros((), dtype=torch.bool, device=floor_hit.device)
    return ~converged & (slow | floor_hit)
