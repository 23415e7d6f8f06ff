"""Nystrom inverse-Hessian products (Hataya & Yamada, AISTATS 2023): no iteration, no step size.

With an orthonormal sketch Omega (n x k) and Y = H Omega (k Hessian-vector products), the
Nystrom approximation is H_nys = Y (Omega^T Y)^+ Y^T, and the solve is
``x = (H_nys + rho I)^{-1} b``. It is computed the numerically stable way of Frangella, Tropp &
Udell ("Randomized Nystrom preconditioning", SIAM J. Matrix Anal. Appl. 2023, Alg. 2.1; Tropp
et al. 2017): shift ``Y_nu = Y + nu Omega`` by ``nu ~ sqrt(n) eps ||Y||``, factor the k x k core
``Omega^T Y_nu``, take the thin SVD ``U Sigma`` of ``B = Y_nu core^{-1/2}``, set
``Lambda = max(Sigma^2 - nu, 0)``, so ``H_nys = U Lambda U^T``, and

    x = U (Lambda + rho)^{-1} U^T b + (b - U U^T b) / rho,

where the second term (the complement of the sketch) is dropped when k = n (it is zero in
exact arithmetic, and rounding divided by a small rho otherwise). The Woodbury form
``(b - C (rho W + C^T C)^{-1} C^T b) / rho`` used before cancels catastrophically as rho -> 0.

``sketch="columns"`` uses k coordinate vectors (k columns of H, as in the paper); ``"gaussian"``
uses orthonormalised Gaussian vectors. Both are drawn from a generator seeded by ``seed`` (no
global random state). With k = n (``rank >= n``, full sketch) the solve is ``(H + rho I)^{-1} b``
to rounding for any rho > 0, including rho -> 0 (then ``H^{-1} b`` for SPD ``H``, accurate to
about ``eps cond(H)``). With k < n it is exact when rank(H) <= k; otherwise ``rho`` acts as the
damping of the small eigenvalues that the sketch misses. Nystrom assumes ``H`` positive
semidefinite: negative curvature met in the sketch's span is dropped from ``H_nys`` and flagged
(``stats["nonpositive_curvature"]``). The flattened parameters are held in dense n x k
matrices: memory k times the parameter count.

Example:
    >>> import torch, hypergrad as hg
    >>> A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    >>> res = hg.nystrom(lambda v: A @ v, torch.ones(3, dtype=torch.float64), rank=3, rho=1e-12)
    >>> torch.allclose(res.solution, torch.tensor([1/3, 1/2, 1.0], dtype=torch.float64),
    ...                rtol=1e-10, atol=0)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import _checks, tree
from ..tree import Tree
from ._common import (
    SolveResult,
    _check_matvec_output,
    _count,
    _relative,
    _resolve_tol,
    _validate_b,
)

__all__ = ["nystrom"]


def nystrom(
    matvec: Callable[[Tree], Tree],
    b: Tree,
    *,
    rank: int = 10,
    rho: float = 1e-3,
    sketch: str = "columns",
    seed: int = 0,
    tol: float | None = None,
) -> SolveResult:
    """Solve ``H x = b`` approximately as ``(H_nys + rho I)^{-1} b`` (see module docstring).

    ``iterations`` counts the ``k = min(rank, n)`` sketch products plus one product to report
    the true residual ``||b - H x|| / ||b||`` of the returned solution (so ``converged`` is
    honest: it is usually False for a low-rank approximation of a full-rank Hessian).
    No host synchronisation from Python (on a GPU, ``torch.linalg.eigh`` and ``svd`` of the
    small k x k / n x k factors synchronise inside torch).
    """
    _checks.callable_(matvec, "matvec")
    ref = _validate_b(b)
    rank = _checks.positive_int(rank, "rank")
    rho = _checks.positive_number(rho, "rho")
    tol = _resolve_tol(tol, ref.dtype)
    if sketch not in ("columns", "gaussian"):
        raise ValueError(f"`sketch` must be 'columns' or 'gaussian', got {sketch!r}")
    bv, unravel = tree.ravel(b)
    n = bv.numel()
    k = min(rank, n)
    dtype = bv.dtype
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    if sketch == "columns":
        idx = torch.randperm(n, generator=g)[:k]
        omega = torch.zeros(n, k, dtype=dtype)
        omega[idx, torch.arange(k)] = 1.0
    else:
        omega = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=dtype)).Q
    omega = omega.to(bv.device)
    cols = []
    for i in range(k):
        hv = matvec(unravel(omega[:, i]))
        if i == 0:
            _check_matvec_output(hv, b)
        cols.append(tree.ravel(hv)[0])
    Y = torch.stack(cols, dim=1)  # n x k, = H Omega
    eps = torch.finfo(dtype).eps
    nu = math.sqrt(n) * eps * torch.linalg.matrix_norm(Y)  # Frobenius >= spectral: safe side
    Y_nu = Y + nu * omega
    core = omega.T @ Y_nu
    core = 0.5 * (core + core.T)  # symmetric in exact arithmetic
    d, q = torch.linalg.eigh(core)
    # PSD H: d >= nu > 0. A non-positive d is negative curvature in span(Omega): drop it.
    keep = d > 0
    inv_sqrt = torch.where(keep, 1.0 / torch.sqrt(torch.where(keep, d, 1.0)), 0.0)
    B = Y_nu @ (q * inv_sqrt)  # B B^T = Y_nu core^+ Y_nu^T
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    lam = torch.clamp(S**2 - nu, min=0.0)
    ub = U.T @ bv
    x = U @ (ub / (lam + rho))
    if k < n:
        x = x + (bv - U @ ub) / rho
    solution = unravel(x)
    hx = tree.ravel(matvec(solution))[0]
    residual = _relative(torch.linalg.vector_norm(bv - hx), torch.linalg.vector_norm(bv))
    return SolveResult(solution, _count(k + 1, residual), residual, residual <= tol,
                       {"rank": k, "rho": rho, "shift": nu, "residual_estimate": False,
                        "nonpositive_curvature": d.min() <= 0})
