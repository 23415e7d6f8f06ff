"""Linear solvers for ``(H + damping I) x = b`` given only ``matvec(v) = H v`` on pytrees.

Every solver has the signature ``solver(matvec, b, **options) -> SolveResult`` and never raises
on non-convergence: the result says how it went (``converged``, ``residual_norm``,
``iterations``, ``stats``; the keys are listed in :class:`SolveResult`) and callers decide.
Pick one with a partial: ``solver=functools.partial(hg.cg, maxiter=20)``. ``tol=None`` is
:func:`default_tol` of ``b``'s dtype (float64 1e-10, float32 1e-5, half 1e-2).

- ``cg``: symmetric positive definite (a strict minimum); the default.
- ``neumann``: the truncated Neumann series (Lorraine et al. 2020), with ``power_iteration``
  behind its ``alpha="auto"``; J terms for J - 1 matvecs, warm start ``x0``.
- ``minres``, ``gmres``, ``normal_cg``: symmetric indefinite, non-symmetric, any non-singular.
- ``nystrom``: a low-rank sketch, no iterations.
- ``adam_preconditioner``: a diagonal preconditioner read from an Adam state.

``residual_norm`` is the true relative residual of the returned solution (to 10% or rounding)
except where ``stats["residual_estimate"]`` is True (Neumann's free residual by default).

Host synchronisations (a tensor read back to Python: ``bool``/``float``/``int``/``.item()``/
``.tolist()``; each one makes a GPU wait) per solve, from Python:

- ``neumann``: none (fixed or automatic ``alpha``, with or without ``x0``); one more to
  validate a ``preconditioner``. ``power_iteration``: one, to validate ``v0``.
- ``cg``: one read per ``check_every`` iterations, plus one: ``steps + 1`` by default. The read
  carries the stopping test, the curvature test and the need for a true residual at once; the
  first one also tells a non-finite ``b`` / ``x0`` (ValueError, no extra read).
- ``minres``: ``steps + 1``. ``gmres``: one per matvec (Arnoldi step or restart), plus one.
  ``normal_cg``: its inner CG's, ``steps + 1``.
- ``nystrom``: none from Python (on a GPU ``torch.linalg.eigh`` / ``svd`` of the small
  factors synchronise inside torch).
"""

from ._common import Matvec, SolveResult, default_tol
from .cg import cg
from .krylov import gmres, minres, normal_cg
from .neumann import neumann, power_iteration
from .nystrom import nystrom
from .preconditioners import adam_preconditioner

__all__ = [
    "SolveResult",
    "Matvec",
    "default_tol",
    "cg",
    "neumann",
    "power_iteration",
    "minres",
    "gmres",
    "normal_cg",
    "nystrom",
    "adam_preconditioner",
]
