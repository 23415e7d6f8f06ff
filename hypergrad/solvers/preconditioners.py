"""Diagonal preconditioners for the IFT solve, read from the inner optimizer's state.

The Neumann series ``x = alpha sum_j (I - alpha H)^j b`` is the response of J steps of plain
gradient descent with step ``alpha`` (Lorraine et al. 2020). When the inner problem is trained
with Adam, its actual per-coordinate step is ``lr / (sqrt(v_hat_i) + eps)``, up to orders of
magnitude larger than ``lr`` on coordinates with small gradients. ``neumann(...,
alpha=lr, preconditioner=adam_preconditioner(opt, params))`` is then the J-step response of the
optimizer the PT really runs (Adam without momentum):

    D_i = 1 / (sqrt(v_i / (1 - beta2^t)) + eps),     x = sum_j (I - lr D H)^j lr D b.

Example:
    >>> import torch, hypergrad as hg
    >>> w = torch.ones(3, requires_grad=True)
    >>> opt = torch.optim.Adam([w], lr=0.1)
    >>> (w * torch.tensor([1.0, 10.0, 100.0])).sum().backward(); opt.step()
    >>> hg.adam_preconditioner(opt, {"w": w})["w"]       # ~ 1 / |gradient|
    tensor([1.0000, 0.1000, 0.0100])
"""

from __future__ import annotations

import torch

from .. import _checks, tree
from ..tree import Tree

__all__ = ["adam_preconditioner"]


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Tree) -> Tree:
    """``1 / (sqrt(v_hat) + eps)`` for every leaf of ``params`` from a ``torch.optim.Adam`` /
    ``AdamW`` state (bias-corrected second moment; each leaf's own param group). Leaves the
    optimizer has not stepped yet get 1 (plain gradient descent). Multiply by the learning rate
    (Neumann ``alpha = lr``) to get Adam's per-coordinate step size."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer)}")
    _checks.tensor_tree(params, "params")
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    def diag(p: torch.Tensor) -> torch.Tensor:
        if id(p) not in groups:
            raise ValueError(
                f"`params` holds a tensor of shape {tuple(p.shape)} that `optimizer` does not "
                "optimize; pass the parameters the optimizer was built with"
            )
        g, st = groups[id(p)], optimizer.state.get(p, {})
        if "betas" not in g or "eps" not in g:
            raise ValueError(
                f"`optimizer` must be Adam-like (param group with 'betas' and 'eps'), got "
                f"{type(optimizer).__name__}"
            )
        if "exp_avg_sq" not in st:
            return torch.ones_like(p.detach())
        step = float(st["step"])
        v_hat = st["exp_avg_sq"] / (1 - g["betas"][1] ** step)
        return 1.0 / (v_hat.sqrt() + g["eps"])

    return tree.map(diag, params)
