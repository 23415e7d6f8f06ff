"""Heavy-ball (Adam-with-momentum) IFT solve for an Adam-trained PT (experimental).

``MetaPretrainer``'s default IFT solve is ``neumann(alpha = pt_lr)``: J steps of *plain
gradient descent* on the PT loss's quadratic model. The PT itself runs Adam, whose step on
coordinate i is about ``lr / (sqrt(v_i) + eps)`` with v Adam's second-moment estimate, 10-1000x
larger than ``lr`` on low-gradient coordinates. So the default series describes how the PT
solution responds to phi over a horizon far shorter than the PT's own dynamics, and in the
rotation task that short-horizon response has the wrong sign far from 90 degrees (RESULTS.md).

The library covers Adam without momentum: ``hg.neumann(alpha=lr)`` with
``MetaPretrainer(ift_preconditioner="adam")`` is the J-step response of Adam-without-momentum
(``ift="adam_neumann"`` / ``"library_adam"`` in the tasks). This module adds Adam's momentum:
:func:`adam_heavy_ball` (``ift="adam_momentum"``), used with the same
``ift_preconditioner="adam"``, which hands it ``D = 1 / (sqrt(v_hat) + eps)`` at every solve.
:func:`solver_for_ift` maps the tasks' ``ift`` names to a solver and ``MetaPretrainer`` options.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

import hypergrad as hg
from hypergrad.solvers import SolveResult

__all__ = ["adam_heavy_ball", "solver_for_ift", "IFT_NAMES", "IFT_LABELS"]

IFT_NAMES = {  # the tasks' ``ift`` options and what each computes (the rotation demo prints it)
    "neumann": "Algorithm 1's IFT (3-term Neumann series, hg.neumann)",
    "forward": "forward-mode tangent d theta/d phi along the PT run (hg.step_jvp on torchopt's "
               "Adam, forward.py), not Algorithm 1's IFT",
    "library_adam": "Algorithm 1's IFT, Neumann series preconditioned by the PT Adam's diagonal",
    "adam_neumann": "Algorithm 1's IFT, Neumann series preconditioned by the PT Adam's diagonal",
    "adam_momentum": "Algorithm 1's IFT, Adam heavy-ball series (precond.adam_heavy_ball)",
}
IFT_LABELS = {  # short names for plot panels and table rows
    "neumann": "Algorithm 1 IFT (Neumann)", "forward": "forward-mode tangent",
    "library_adam": "IFT, Adam-preconditioned", "adam_neumann": "IFT, Adam-preconditioned",
    "adam_momentum": "IFT, Adam heavy-ball",
}


def solver_for_ift(ift: str, iterations: int, pt_lr: float, alpha_scale: float = 1.0
               ) -> tuple[Callable[..., SolveResult], dict[str, Any]]:
    """``(solver, MetaPretrainer options)`` for a task's ``ift`` name (``IFT_NAMES``), alpha =
    pt_lr * scale: ``hg.neumann`` (``forward``'s trainer never solves) or
    :func:`adam_heavy_ball`; ``library_adam`` and ``adam_*`` with
    ``ift_preconditioner="adam"``, which hands the solver the PT Adam's diagonal at every solve.
    """
    if ift not in IFT_NAMES:
        raise ValueError(f"`ift` must be one of {tuple(IFT_NAMES)}, got {ift!r}")
    fn = adam_heavy_ball if ift == "adam_momentum" else hg.neumann
    extra = {"ift_preconditioner": "adam"} if ift.startswith(("adam_", "library_adam")) else {}
    return functools.partial(fn, iterations=iterations, alpha=pt_lr * alpha_scale), extra


def adam_heavy_ball(matvec, b: dict[str, torch.Tensor], *,
                    preconditioner: dict[str, torch.Tensor], alpha: float, iterations: int = 3,
                    beta1: float = 0.9, max_residual: float = 5.0) -> SolveResult:
    """J steps of linearised Adam *with* its momentum on 0.5 x^T H x - b^T x from x = 0:

        m <- beta1 m + (1 - beta1) (b - H x),   x <- x + alpha D m     (D = preconditioner).

    That is how the PT solution (Adam, second moments frozen) responds to the
    phi-perturbation over J PT steps; it is stable wherever the PT's own Adam is (heavy
    ball tolerates alpha D H up to 2 (1 + beta1) / (1 - beta1), not 2), and x -> H^{-1} b.
    If the J-step residual exceeds ``max_residual`` (the linearised dynamics grew: negative
    curvature far from a PT minimum), the iterate with the smallest ``||b - H x||`` is returned
    (x = 0 if none beats it).
    """
    if not isinstance(b, dict):
        raise TypeError("adam_heavy_ball expects dict-shaped PT parameters")
    d = {k: alpha * preconditioner[k] for k in b}
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    m = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    b_norm = torch.sqrt(sum((v.double() ** 2).sum() for v in b.values())).clamp_min(1e-30)
    best, best_res = x, torch.ones((), dtype=torch.float64, device=b_norm.device)
    res = best_res
    for j in range(iterations + 1):
        if j > 0:
            hx = matvec(x)
            r = {k: b[k] - hx[k] for k in b}
            res = torch.sqrt(sum((v.double() ** 2).sum() for v in r.values())) / b_norm
            if not bool(torch.isfinite(res)):
                break
            if res <= best_res:
                best, best_res = x, res
        if j == iterations:
            break
        m = {k: beta1 * m[k] + (1 - beta1) * r[k] for k in m}
        x = {k: x[k] + d[k] * m[k] for k in x}
    if bool(torch.isfinite(res)) and res <= max_residual:
        best, best_res = x, res  # the J-step response itself
    return SolveResult(best, torch.tensor(iterations, device=b_norm.device),
                       best_res.to(b_norm.dtype), best_res <= 1e-6, {"precond": "adam-hb"})
