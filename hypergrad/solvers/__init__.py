"""Linear solvers for ``H x = b`` given only ``matvec(v) = H v`` on pytrees.

Every solver has the signature ``solver(matvec, b, **options) -> SolveResult`` and never raises
on non-convergence: the result says how it went (``converged``, ``residual_norm``,
``iterations``) and callers decide. Pick one with a partial:
``solver=functools.partial(hg.cg, maxiter=20)``.

- ``cg``: symmetric positive definite (a strict minimum); the default.
- ``neumann``: the truncated Neumann series (Lorraine et al. 2020), with ``power_iteration``
  behind its ``alpha="auto"``.
- ``minres``, ``gmres``, ``normal_cg``: symmetric indefinite, non-symmetric, any non-singular.
- ``nystrom``: a low-rank sketch, no iterations.
- ``adam_preconditioner``: a diagonal preconditioner read from an Adam state.
"""

from ._common import Matvec, SolveResult
from .cg import cg
from .krylov import gmres, minres, normal_cg
from .neumann import neumann, power_iteration
from .nystrom import nystrom
from .preconditioners import adam_preconditioner

__all__ = [
    "SolveResult",
    "Matvec",
    "cg",
    "neumann",
    "power_iteration",
    "minres",
    "gmres",
    "normal_cg",
    "nystrom",
    "adam_preconditioner",
]
