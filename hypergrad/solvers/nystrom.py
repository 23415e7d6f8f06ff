"""Nystrom inverse-Hessian products (Hataya & Yamada, AISTATS 2023): no iteration, no step size.

With k sketch vectors Omega (n x k) and C = H Omega (k Hessian-vector products), the Nystrom
approximation is H ~= C W^+ C^T with W = Omega^T C. Adding rho I and applying Woodbury,

    (rho I + C W^+ C^T)^{-1} b = (1/rho) (b - C (rho W + C^T C)^{-1} C^T b),       (Woodbury)

a k x k solve. ``sketch="columns"`` uses k coordinate vectors (k columns of H, as in the paper);
``"gaussian"`` uses Gaussian vectors. Both are drawn from a generator seeded by ``seed`` (no
global random state). Exact when rank(H) <= k and rho -> 0; otherwise ``rho`` acts as the
damping of the small eigenvalues that the sketch misses. The flattened parameters are held in
dense n x k matrices: memory k times the parameter count.

Example:
    >>> import torch, hypergrad as hg
    >>> A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    >>> res = hg.nystrom(lambda v: A @ v, torch.ones(3, dtype=torch.float64), rank=3, rho=1e-10)
    >>> torch.allclose(res.solution, torch.tensor([1/3, 1/2, 1.0], dtype=torch.float64))
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _checks, tree
from ..tree import Tree
from ._common import SolveResult, _check_matvec_output, _validate_b

__all__ = ["nystrom"]


def nystrom(
    matvec: Callable[[Tree], Tree],
    b: Tree,
    *,
    rank: int = 10,
    rho: float = 1e-3,
    sketch: str = "columns",
    seed: int = 0,
    tol: float = 1e-6,
) -> SolveResult:
    """Solve ``H x = b`` approximately as ``(H_nys + rho I)^{-1} b`` (see module docstring).

    ``iterations`` counts the ``rank`` sketch products plus one product to report the true
    residual ``||b - H x|| / ||b||`` of the returned solution (so ``converged`` is honest: it is
    usually False for a low-rank approximation of a full-rank Hessian).
    """
    _checks.callable_(matvec, "matvec")
    ref = _validate_b(b)
    rank = _checks.positive_int(rank, "rank")
    rho = _checks.positive_number(rho, "rho")
    tol = _checks.nonneg_number(tol, "tol")
    if sketch not in ("columns", "gaussian"):
        raise ValueError(f"`sketch` must be 'columns' or 'gaussian', got {sketch!r}")
    bv, unravel = tree.ravel(b)
    n = bv.numel()
    k = min(rank, n)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    if sketch == "columns":
        idx = torch.randperm(n, generator=g)[:k]
        omega = torch.zeros(n, k, dtype=bv.dtype)
        omega[idx, torch.arange(k)] = 1.0
    else:
        omega = torch.randn(n, k, generator=g, dtype=bv.dtype)
    omega = omega.to(bv.device)
    cols = []
    for i in range(k):
        hv = matvec(unravel(omega[:, i]))
        if i == 0:
            _check_matvec_output(hv, b)
        cols.append(tree.ravel(hv)[0])
    C = torch.stack(cols, dim=1)  # n x k, = H Omega
    W = omega.T @ C  # k x k
    W = 0.5 * (W + W.T)  # symmetric in exact arithmetic
    small = rho * W + C.T @ C
    z = torch.linalg.lstsq(small, (C.T @ bv).unsqueeze(1)).solution.squeeze(1)
    x = (bv - C @ z) / rho
    solution = unravel(x)
    hx = tree.ravel(matvec(solution))[0]
    residual = torch.linalg.vector_norm(bv - hx) / torch.linalg.vector_norm(bv)
    if float(torch.linalg.vector_norm(bv)) == 0:
        residual = torch.zeros((), dtype=ref.dtype)
    return SolveResult(solution, torch.tensor(k + 1), residual, residual <= tol,
                       {"rank": k, "rho": rho})
