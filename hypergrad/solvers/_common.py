"""What every solver shares: the ``SolveResult`` contract and the checks on ``b`` and ``matvec``.

Every solver has the signature ``solver(matvec, b, **options) -> SolveResult`` and never raises
on non-convergence: the result says how it went (``converged``, ``residual_norm``,
``iterations``) and callers decide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .. import _checks, tree
from ..tree import Tree

__all__ = ["SolveResult", "Matvec"]

Matvec = Callable[[Tree], Tree]


class SolveResult(NamedTuple):
    """What a solve produced and how it went.

    solution: the approximate ``x`` (a pytree like ``b``).
    iterations: matrix-vector products spent (0-dim int tensor).
    residual_norm: ``||b - H x|| / ||b||`` of the returned solution (0-dim tensor; inf if the
        iteration blew up).
    converged: whether ``residual_norm <= tol`` (0-dim bool tensor).
    stats: solver-specific diagnostics, e.g. ``nonpositive_curvature`` (CG met p^T H p <= 0)
        or ``alpha`` / ``lambda_max`` (Neumann with ``alpha="auto"``).
    """

    solution: Tree
    iterations: torch.Tensor
    residual_norm: torch.Tensor
    converged: torch.Tensor
    stats: dict[str, Any] | None = None


def _validate_b(b: Tree) -> torch.Tensor:
    flat = _checks.tensor_tree(b, "b")
    _checks.finite(b, "b")
    return flat[0]


def _check_matvec_output(hv: Tree, b: Tree) -> None:
    try:
        tree.check_same_structure(b, hv, names=("b", "matvec(b)"))
    except ValueError as e:
        raise ValueError(f"`matvec` must map a pytree like `b` to one like `b`: {e}") from None


def _flat_matvec(matvec: Matvec, b: Tree, unravel: Callable[[torch.Tensor], Tree]) -> Matvec:
    checked: list[bool] = []

    def flat(v: torch.Tensor) -> torch.Tensor:
        out = matvec(unravel(v))
        if not checked:
            _check_matvec_output(out, b)
            checked.append(True)
        return tree.ravel(out)[0]

    return flat


def _ravelable(b: Tree) -> bool:
    leaves = tree.leaves(b)
    return (not isinstance(b, torch.Tensor) and len(leaves) > 1
            and all(x.dtype == leaves[0].dtype and x.device == leaves[0].device for x in leaves))
