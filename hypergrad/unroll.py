"""Unrolled (iterative) differentiation through an inner optimisation.

``unroll`` runs ``steps`` applications of a step map ``params_{t+1} = step(params_t, hparams, t)``
and records only the last ``truncate`` of them for backprop (truncated back-propagation;
Shaban et al. 2019). With ``truncate=None`` every step is recorded: exact reverse-mode
differentiation of the whole trajectory, used as the reference for the IFT.

Example:
    >>> import torch, hypergrad as hg
    >>> f = lambda p, h: 0.5 * ((p - h) ** 2).sum()
    >>> h = torch.tensor([2.0], requires_grad=True)
    >>> p = hg.unroll(hg.gradient_step(f, lr=0.5), torch.zeros(1), h, steps=30)
    >>> p.sum().backward(); round(float(h.grad), 6)   # p_T = (1 - 0.5^T) h
    1.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint as _ckpt

from . import _checks, tree
from .tree import Tree

__all__ = ["unroll", "gradient_step", "optimizer_step"]

Step = Callable[[Tree, Tree, int], Tree]


def unroll(
    step: Step,
    params: Tree,
    hparams: Tree,
    steps: int,
    *,
    truncate: int | None = None,
    checkpoint_every: int | None = None,
) -> Tree:
    """Apply ``step`` ``steps`` times; only the last ``truncate`` applications are differentiable.

    Args:
        step: ``step(params, hparams, t) -> params`` (same pytree structure). ``t`` runs from 0.
        params: the initial state: parameters, or any pytree (e.g. ``(params, opt_state)``).
            If it is part of an autograd graph (say the output of ``implicit_solution``),
            gradients flow back into it through the recorded steps when nothing is truncated.
        hparams: passed unchanged to every step.
        truncate: number of final steps recorded (``None`` = all). The first
            ``steps - truncate`` run on detached tensors, so no graph is kept for them.
        checkpoint_every: recompute recorded steps in backward from checkpoints taken every
            this many steps (``torch.utils.checkpoint``): memory grows with ``steps /
            checkpoint_every + checkpoint_every`` states instead of ``steps``, at the price of one
            more forward pass per step.
    """
    _checks.callable_(step, "step")
    steps = _checks.nonneg_int(steps, "steps")
    if truncate is None:
        truncate = steps
    truncate = _checks.nonneg_int(truncate, "truncate")
    if truncate > steps:
        raise ValueError(
            f"`truncate` ({truncate}) must be <= `steps` ({steps}): it counts recorded steps"
        )
    if checkpoint_every is not None:
        checkpoint_every = _checks.positive_int(checkpoint_every, "checkpoint_every")
    spec = tree.flatten(params)[1]
    free = steps - truncate
    if free:
        frozen_h = tree.detach(hparams)
        with torch.no_grad():
            state = tree.detach(params)
        for t in range(free):
            state = tree.detach(step(state, frozen_h, t))
            _check_state(state, spec, t)
    else:
        state = params
    t = free
    while t < steps:
        if checkpoint_every is None:
            state = step(state, hparams, t)
            _check_state(state, spec, t)
            t += 1
        else:
            n = min(checkpoint_every, steps - t)
            state = _checkpointed(step, state, hparams, t, n, spec)
            t += n
    return state


def _check_state(state: Tree, spec: Any, t: int) -> None:
    if tree.flatten(state)[1] != spec:
        raise ValueError(
            f"`step` must return a pytree of the structure of `params`; at t={t} it returned "
            f"{tree.flatten(state)[1]} instead of {spec}"
        )


def _checkpointed(step: Step, state: Tree, hparams: Tree, t0: int, n: int, spec: Any) -> Tree:
    s_flat, s_spec = tree.flatten(state)
    h_flat, h_spec = tree.flatten(hparams)
    tensor_idx = [i for i, x in enumerate(s_flat) if isinstance(x, torch.Tensor)]

    def segment(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = list(s_flat)
        for i, x in zip(tensor_idx, tensors[: len(tensor_idx)]):
            s[i] = x
        h = tree.unflatten(list(tensors[len(tensor_idx) :]), h_spec)
        cur = tree.unflatten(s, s_spec)
        for k in range(n):
            cur = step(cur, h, t0 + k)
        out = tree.flatten(cur)[0]
        return tuple(out[i] for i in tensor_idx)

    outs = _ckpt.checkpoint(
        segment, *[s_flat[i] for i in tensor_idx], *h_flat, use_reentrant=False
    )
    s = list(s_flat)
    for i, x in zip(tensor_idx, outs):
        s[i] = x
    return tree.unflatten(s, spec)


def _needs_graph(*trees: Tree) -> bool:
    return torch.is_grad_enabled() and any(tree.requires_grad(t) for t in trees)


def gradient_step(inner_loss: Callable[[Tree, Tree], torch.Tensor], lr: float) -> Step:
    """The step ``params - lr * d inner_loss(params, hparams) / d params`` (differentiable).

    The step keeps the graph (``create_graph=True``) only when its inputs are part of one, so
    the same step runs cheaply in the truncated part of an :func:`unroll`.
    """
    _checks.callable_(inner_loss, "inner_loss")
    lr = _checks.positive_number(lr, "lr")

    def step(params: Tree, hparams: Tree, t: int) -> Tree:
        create = _needs_graph(params, hparams)
        flat, spec = tree.flatten(params)
        with torch.enable_grad():
            p = [x if x.requires_grad else x.detach().requires_grad_(True) for x in flat]
            loss = _checks.scalar_loss(inner_loss(tree.unflatten(p, spec), hparams), "inner_loss")
            grads = torch.autograd.grad(loss, p, create_graph=create, allow_unused=True)
        new = [x - lr * (torch.zeros_like(x) if g is None else g) for x, g in zip(p, grads)]
        if not create:
            new = [x.detach() for x in new]
        return tree.unflatten(new, spec)

    return step


def optimizer_step(inner_loss: Callable[[Tree, Tree], torch.Tensor], optimizer: Any) -> Step:
    """A step over the state ``(params, opt_state)`` for a torchopt functional optimizer.

    ``optimizer`` is e.g. ``torchopt.adam(lr=1e-2)``; it is used out of place
    (``inplace=False``) so the whole update is differentiable. Start the unroll from
    ``(params, optimizer.init(params))``.

    Example:
        >>> import torch, torchopt, hypergrad as hg
        >>> f = lambda p, h: ((p - h) ** 2).sum()
        >>> opt = torchopt.sgd(lr=0.25)
        >>> h = torch.tensor([1.0], requires_grad=True)
        >>> p0 = torch.zeros(1)
        >>> p, _ = hg.unroll(hg.optimizer_step(f, opt), (p0, opt.init(p0)), h, steps=2)
        >>> round(float(p.detach()), 4)
        0.75
    """
    _checks.callable_(inner_loss, "inner_loss")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            "`optimizer` must be a functional optimizer with .init and .update "
            f"(e.g. torchopt.adam(lr=...)), got {type(optimizer).__name__}"
        )
    import torchopt  # optional dependency, only for this helper

    def step(state: Tree, hparams: Tree, t: int) -> Tree:
        params, opt_state = state
        create = _needs_graph(params, hparams)
        flat, spec = tree.flatten(params)
        with torch.enable_grad():
            p = [x if x.requires_grad else x.detach().requires_grad_(True) for x in flat]
            loss = _checks.scalar_loss(inner_loss(tree.unflatten(p, spec), hparams), "inner_loss")
            grads = torch.autograd.grad(loss, p, create_graph=create, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(p, grads)]
        updates, opt_state = optimizer.update(
            tree.unflatten(grads, spec), opt_state, params=tree.unflatten(p, spec), inplace=False
        )
        new = torchopt.apply_updates(tree.unflatten(p, spec), updates, inplace=False)
        if not create:
            new, opt_state = tree.detach(new), tree.detach(opt_state)
        return (new, opt_state)

    return step
