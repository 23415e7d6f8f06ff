"""The SAMA configuration (Choe et al., NeurIPS 2023) as a solver: no inverse-Hessian solve.

SAMA replaces ``H^{-1}`` in the IFT by the Adam-preconditioned identity,

    x = alpha · D ⊙ b,      D = 1 / (sqrt(v_hat) + eps)     (hg.adam_preconditioner),

the first term of the preconditioned Neumann series (``hg.neumann(iterations=1,
preconditioner=D, alpha=alpha)`` returns the same ``x``, but spends a matvec on its residual).
With ``alpha`` the inner learning rate, ``-(d2f/dφ dθ) x`` is the hypergradient through one
more Adam step (without momentum) from ``θ``: the greedy, one-step response of the optimizer
the inner problem really runs. Paired with finite-difference mixed products
(``products="finite_difference"``), a hypergradient costs one outer gradient plus two inner
gradients w.r.t. ``hparams``, and never a second-order graph.

When the bias is acceptable (it is a bias: ``alpha D`` is not ``H^{-1}``):

* when the direction of the hypergradient matters more than its size and it is carried by
  gradient alignment: per-example or per-task loss weights (learning to reweight, Ren et al.
  2018: ``dL/dφ_i ∝ -<∇ℓ_i, D ∇L_val>``), data selection, loss mixing. The sign per
  hyperparameter is what moves the weights, and a noisy example's gradient opposes the clean
  validation gradient under any positive ``D``;
* when ``D H`` is close to ``I / alpha`` (Adam's diagonal captures the curvature), so that
  ``alpha D`` approximates ``H^{-1}`` (the residual ``||b - H x|| / ||b||`` measures this:
  ``sama(..., residual=True)`` spends one matvec to report it);
* online, when hyperparameters are updated every few inner steps and the inner problem is far
  from its optimum anyway (the IFT premise fails for every solver there).

It is not acceptable when the hyperparameter acts through the inner optimum over a long
horizon: regularisation strengths, augmentation magnitudes tuned for the final model, or
anything whose one-step effect has the opposite sign of its long-run effect (the short-horizon
bias of Wu et al. 2018); nor when ``H`` is ill-conditioned along the directions that carry
``b`` (low-curvature directions dominate ``H^{-1} b`` and get weight ``alpha D`` instead of
``1/λ``). There use ``hg.cg`` (with FD products if there is no double backward).

Example:
    >>> import torch, hypergrad as hg
    >>> H = torch.diag(torch.tensor([2.0, 8.0]))
    >>> r = hg.sama(lambda v: H @ v, torch.ones(2), alpha=0.5, residual=True)
    >>> r.solution, float(r.residual_norm), int(r.iterations)    # D = I: x = alpha b
    (tensor([0.5000, 0.5000]), 2.1213..., 1)
"""

from __future__ import annotations

import torch

from .. import _checks, tree
from ..tree import Tree
from ._common import Matvec, SolveResult, _check_matvec_output, _validate_b
from .neumann import _positive_diagonal

__all__ = ["sama"]


def sama(
    matvec: Matvec,
    b: Tree,
    *,
    alpha: float = 1.0,
    preconditioner: Tree | None = None,
    residual: bool = False,
    tol: float = 1e-6,
) -> SolveResult:
    """``x = alpha · D ⊙ b`` in place of ``H^{-1} b`` (SAMA's Adam-preconditioned identity).

    Args:
        matvec: ``v -> H v``; not called unless ``residual=True``.
        b: the right-hand side (``dL/dparams`` in the IFT).
        alpha: the scale, normally the inner learning rate (Adam's ``lr``).
        preconditioner: ``D``, a tree like ``b`` of positive entries; usually
            ``hg.adam_preconditioner(optimizer, params)``. ``None`` is ``D = I`` (plain SGD's
            one-step response, the DARTS / T1-T2 approximation).
        residual: spend one matvec to report the true relative residual
            ``||b - H x|| / ||b||`` (``converged`` is then ``residual <= tol``). Without it
            no matvec is spent, ``residual_norm`` is NaN (unknown), ``converged`` is False and
            ``stats["residual_estimate"]`` is True: the result is an approximation by design,
            so callers should not read it as a converged solve (``implicit_grad(...,
            on_failure="ignore")``).
        tol: threshold for ``converged`` when ``residual=True``.

    Returns ``SolveResult`` with ``iterations`` = matvecs spent (0 or 1) and ``stats`` holding
    ``alpha`` and ``residual_estimate``.
    """
    _checks.callable_(matvec, "matvec")
    ref = _validate_b(b)
    alpha = _checks.positive_number(alpha, "alpha")
    tol = _checks.nonneg_number(tol, "tol")
    if not isinstance(residual, bool):
        raise TypeError(f"`residual` must be a bool, got {type(residual).__name__}")
    d = None if preconditioner is None else _positive_diagonal(preconditioner, b)
    x = tree.scale(b if d is None else tree.map(torch.mul, d, b), alpha)
    stats = {"alpha": alpha, "residual_estimate": not residual}
    if not residual:
        nan = torch.full((), float("nan"), dtype=ref.dtype, device=ref.device)
        return SolveResult(x, torch.tensor(0), nan, torch.tensor(False), stats)
    hx = matvec(x)
    _check_matvec_output(hx, b)
    b_norm = tree.norm(b)
    r = tree.norm(tree.sub(b, hx)) / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    return SolveResult(x, torch.tensor(1), r, r <= tol, stats)
