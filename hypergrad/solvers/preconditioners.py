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
    flat, spec = tree.flatten(params)
    _checks.tensor_tree(params, "params")
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for p in flat:
        if id(p) not in groups:
            raise ValueError(
                f"`params` holds a tensor of shape {tuple(p.shape)} that `optimizer` does not "
                "optimize; pass the parameters the optimizer was built with"
            )
        g = groups[id(p)]
        if "betas" not in g or "eps" not in g:
            raise ValueError(
                f"`optimizer` must be Adam-like (param group with 'betas' and 'eps'), got "
                f"{type(optimizer).__name__}"
            )
    states = [optimizer.state.get(p, {}) for p in flat]
    stepped = [i for i, st in enumerate(states) if "exp_avg_sq" in st]
    steps = _read_counts([states[i]["step"] for i in stepped])
    out = [torch.ones_like(p.detach()) for p in flat]  # not stepped yet: plain gradient descent
    for i, step in zip(stepped, steps):
        g = groups[id(flat[i])]
        v_hat = states[i]["exp_avg_sq"] / (1 - g["betas"][1] ** step)
        out[i] = 1.0 / (v_hat.sqrt() + g["eps"])
    return tree.unflatten(out, spec)


def _read_counts(counts: list) -> list[float]:
    """The optimizer's step counts as Python floats: tensors in torch.optim's state (on the
    parameters' device with ``capturable=True`` / ``fused=True``) are read in one transfer per
    device, not one ``float()`` per leaf."""
    values: dict[int, float] = {}
    by_device: dict[torch.device, list[int]] = {}
    for i, c in enumerate(counts):
        if isinstance(c, torch.Tensor):
            by_device.setdefault(c.device, []).append(i)
        else:
            values[i] = float(c)
    for device, idx in by_device.items():
        dtype = torch.float32 if device.type == "mps" else torch.float64
        got = torch.stack([counts[i].detach().reshape(()).to(dtype) for i in idx]).tolist()
        values.update(zip(idx, got))
    return [values[i] for i in range(len(counts))]
