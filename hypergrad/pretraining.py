"""The two-stage hypergradient of "Meta-Learning to Improve Pre-Training" (Raghu et al. 2021).

The meta-objective is g(phi) = L_FT(Alg_FT(Alg_PT(phi))), and Algorithm 1 differentiates it as
(their Eq. 2-4)

    dg/dphi = dL_val/d(theta_FT(K), psi_FT(K))  x  d(theta_FT(K), psi_FT(K))/d theta_PT
              x  d theta_PT/d phi,

    d theta_PT/d phi = -[d2 L_PT / d theta d theta^T]^{-1} d2 L_PT / d theta d phi^T     (IFT)

with the FT Jacobian from K differentiable fine-tuning steps started at theta_FT(0) = theta_PT.
Here it is literally the library's primitives composed: ``implicit_solution`` (the IFT node)
feeds ``unroll`` (the K FT steps), whose end point feeds the validation loss; one backward
gives the hypergradient. Nothing is implemented twice.

Example (a linear model; PT and FT share the weight vector):
    >>> import torch, hypergrad as hg
    >>> torch.set_default_dtype(torch.float64)
    >>> X = torch.randn(32, 3); y = X @ torch.tensor([1.0, -2.0, 0.5])
    >>> pt = lambda p, h: ((X @ p["w"] - y) ** 2).mean() + (h["l2"].exp() * p["w"] ** 2).sum()
    >>> ft = lambda e, hd: ((X @ e["w"] * hd["s"] - y) ** 2).mean()
    >>> w = torch.linalg.solve(2 * X.T @ X / 32 + 2 * torch.eye(3), 2 * X.T @ y / 32)  # PT optimum
    >>> res = hg.pretraining_hypergrad(pt, ft, ft, {"w": w}, {"s": torch.ones(())},
    ...                                {"l2": torch.zeros(3)}, ft_steps=1)
    >>> torch.set_default_dtype(torch.float32)
    >>> res.hypergrad["l2"].shape
    torch.Size([3])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from . import _checks, tree
from .implicit import implicit_solution
from .solvers import SolveResult, neumann
from .tree import Tree
from .unroll import gradient_step, unroll

__all__ = ["pretraining_hypergrad", "PretrainingHypergrad", "default_solver"]

default_solver = functools.partial(neumann, iterations=5, alpha="auto", power_iterations=10)


class PretrainingHypergrad(NamedTuple):
    """``hypergrad`` (like hparams), ``ft_head`` after the K FT steps (detached, to keep
    online), ``val_loss`` (0-dim), ``info`` (diagnostics of the IFT solve, see implicit_grad)."""

    hypergrad: Tree
    ft_head: Tree
    val_loss: torch.Tensor
    info: dict[str, Any]


def pretraining_hypergrad(
    pt_loss: Callable[[Tree, Tree], torch.Tensor],
    ft_loss: Callable[[Tree, Tree], torch.Tensor],
    val_loss: Callable[[Tree, Tree], torch.Tensor],
    pt_params: Tree,
    ft_head: Tree,
    hparams: Tree,
    *,
    encoder: Callable[[Tree], Tree] | None = None,
    ft_steps: int = 1,
    ft_lr: float = 1e-2,
    head_only: bool = True,
    solver: Callable[..., SolveResult] | None = None,
    on_failure: str = "ignore",
    stationarity_tol: float | None = None,
) -> PretrainingHypergrad:
    """One hypergradient of Algorithm 1 (Raghu et al. 2021).

    Args:
        pt_loss: ``L_PT(pt_params, hparams)`` on one fixed PT batch (all of its randomness fixed).
        ft_loss: ``L_FT(enc_params, ft_head)`` on the FT-train batch (the K unrolled steps).
        val_loss: ``L_FT(enc_params, ft_head)`` on the FT-val batch (the meta-objective).
        pt_params: the current PT solution theta_PT (encoder and PT head): the IFT is taken
            over all of it.
        ft_head: the FT head psi_FT. hparams: the meta-parameters phi.
        encoder: maps ``pt_params`` to the part the FT model uses (default: all of it).
        ft_steps: K, the number of differentiable FT steps (0 = no FT Jacobian).
        ft_lr: step size of the FT unroll (plain gradient descent).
        head_only: only the head moves in the unroll (the encoder output still depends on
            theta_PT, so the hypergradient flows through the features); else encoder and head.
        solver: inverse-Hessian solver for the IFT; default ``neumann(iterations=5,
            alpha="auto")``. The online loop uses the PT step size as ``alpha`` instead.
        on_failure, stationarity_tol: as in :func:`hypergrad.implicit_grad`. Online PT is never at
            a stationary point, so the defaults neither check nor warn; read ``info`` instead.
    """
    for f, name in ((pt_loss, "pt_loss"), (ft_loss, "ft_loss"), (val_loss, "val_loss")):
        _checks.callable_(f, name)
    if encoder is not None:
        _checks.callable_(encoder, "encoder")
    ft_steps = _checks.nonneg_int(ft_steps, "ft_steps")
    _checks.tensor_tree(ft_head, "ft_head")
    _checks.tensor_tree(hparams, "hparams")
    h = tree.detach(hparams, requires_grad=True)
    info: dict[str, Any] = {}
    # theta_PT as a function of phi through the IFT (values unchanged, backward = Eq. 3).
    theta = implicit_solution(
        pt_loss, tree.detach(pt_params), h, solver=solver or default_solver,
        on_failure=on_failure, stationarity_tol=stationarity_tol, info=info,
    )
    enc = encoder(theta) if encoder is not None else theta
    head0 = tree.detach(ft_head)
    if head_only:
        # theta_FT(k+1) = theta_FT(k) for the encoder; psi(k+1) = psi(k) - lr dL_FT/dpsi.
        # The encoder enters the step as a constant of the unroll ("hparams" of the step).
        step = gradient_step(lambda head, e: ft_loss(e, head), ft_lr)
        head_k = unroll(step, head0, enc, ft_steps)
        enc_k = enc
    else:
        step = gradient_step(lambda s, _: ft_loss(s[0], s[1]), ft_lr)
        enc_k, head_k = unroll(step, (enc, head0), (), ft_steps)
    with torch.enable_grad():
        val = _checks.scalar_loss(val_loss(enc_k, head_k), "val_loss")
        h_flat = tree.leaves(h)
        grads = (
            torch.autograd.grad(val, h_flat, allow_unused=True)
            if val.requires_grad
            else [None] * len(h_flat)
        )
    hyper = tree.unflatten(
        [torch.zeros_like(x) if g is None else g for x, g in zip(h_flat, grads)],
        tree.flatten(h)[1],
    )
    return PretrainingHypergrad(hyper, tree.detach(head_k), val.detach(), info)
