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
        step: ``step(params, hparams, t) -> params`` (same pytree structure, leaf shapes and
            dtypes). ``t`` runs from 0.
        params: the initial state: parameters, or any pytree (e.g. ``(params, opt_state)``).
            If it is part of an autograd graph (say the output of ``implicit_solution``),
            gradients flow back into it through the recorded steps when nothing is truncated.
        hparams: passed unchanged to every step.
        truncate: number of final steps recorded (``None`` = all). The first
            ``steps - truncate`` run on detached tensors, so no graph is kept for them.
        checkpoint_every: recompute recorded steps in backward from checkpoints taken every
            this many steps: memory grows with ``steps / checkpoint_every + checkpoint_every``
            states instead of ``steps``, at the price of one more forward pass per step (the
            RNG state is restored for the recomputation). Works with ``.backward()``,
            ``torch.autograd.grad`` and double backward (``create_graph=True``).

    NaN/inf: the first step whose iterate holds NaN/inf is tracked on the device (no host read
    per step) and read once at the end; then ``FloatingPointError`` names the step ``t`` and
    the leaf (e.g. a learning rate too large for the loss: the iterates overflow). A
    non-finite initial ``params`` raises ``ValueError``. A step that changes the structure, a
    leaf's shape or its dtype raises at once.
    """
    return _unroll(step, params, hparams, steps, truncate=truncate,
                   checkpoint_every=checkpoint_every, check_finite=True)


def _unroll(step: Step, params: Tree, hparams: Tree, steps: int, *, truncate: int | None = None,
            checkpoint_every: int | None = None, check_finite: bool = True) -> Tree:
    """:func:`unroll`; ``check_finite=False`` skips the NaN/inf tracking and its one host read
    (for internal callers that check the end result themselves)."""
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
    spec = _State(params)
    watch = _NonFinite(params, steps) if check_finite else None
    free = steps - truncate
    if free:
        frozen_h = tree.detach(hparams)
        with torch.no_grad():
            state = tree.detach(params)
        for t in range(free):
            state = tree.detach(step(state, frozen_h, t))
            spec.check(state, t)
            if watch is not None:
                watch.see(state, t)
    else:
        state = params
    t = free
    while t < steps:
        if checkpoint_every is None:
            state = step(state, hparams, t)
            spec.check(state, t)
            if watch is not None:
                watch.see(state, t)
            t += 1
        else:
            n = min(checkpoint_every, steps - t)
            state = _checkpointed(step, state, hparams, t, n, spec, watch)
            t += n
    if watch is not None:
        watch.report()
    return state


class _State:
    """The structure, leaf shapes and dtypes every step must preserve (Python-only checks)."""

    def __init__(self, params: Tree) -> None:
        flat, self.spec = tree.flatten(params)
        self.meta = [(x.shape, x.dtype) if isinstance(x, torch.Tensor) else None for x in flat]

    def check(self, state: Tree, t: int) -> None:
        flat, spec = tree.flatten(state)
        if spec != self.spec:
            raise ValueError(
                f"`step` must return a pytree of the structure of `params`; at t={t} it "
                f"returned {spec} instead of {self.spec}"
            )
        for i, (x, m) in enumerate(zip(flat, self.meta)):
            if m is None or not isinstance(x, torch.Tensor):
                continue
            if x.shape != m[0]:
                raise ValueError(f"`step` changed the shape of leaf {i} of the state at t={t}: "
                                 f"{tuple(m[0])} -> {tuple(x.shape)}")
            if x.dtype != m[1]:
                raise TypeError(f"`step` changed the dtype of leaf {i} of the state at t={t}: "
                                f"{m[1]} -> {x.dtype} (hypergrad never casts silently)")


class _NonFinite:
    """The first step at which each floating leaf of the state became NaN/inf, kept on the
    device (a few tiny tensor ops per step, no host read) and read once by :meth:`report`."""

    def __init__(self, params: Tree, steps: int) -> None:
        flat = tree.leaves(params)
        self.index = [i for i, x in enumerate(flat)
                      if isinstance(x, torch.Tensor) and x.is_floating_point()]
        self.shapes = [tuple(flat[i].shape) for i in self.index]
        self.never = steps  # sentinel: "finite at every step"
        self.first: torch.Tensor | None = None
        self.initial: torch.Tensor | None = None
        if self.index:
            self.initial = self._bad(flat)
            device = self.initial.device
            self.first = torch.full((len(self.index),), steps, dtype=torch.int64, device=device)

    def _bad(self, flat: list) -> torch.Tensor:
        return torch.stack([~torch.isfinite(flat[i].detach()).all() for i in self.index])

    def see(self, state: Tree, t: int) -> None:
        if self.first is None:
            return
        bad = self._bad(tree.leaves(state)).to(self.first.device)
        unset = self.first == self.never
        self.first = torch.where(bad & unset, torch.full_like(self.first, t), self.first)

    def report(self) -> None:
        if self.first is None or self.initial is None:  # set together: no floating leaf
            return
        values = torch.cat([self.initial.to(self.first.device, torch.int64), self.first]).tolist()
        k = len(self.index)
        initial, first = values[:k], values[k:]
        for j, bad in enumerate(initial):
            if bad:
                raise ValueError(f"`params` leaf {self.index[j]} (shape {self.shapes[j]}) "
                                 "contains NaN/inf: the unroll starts from a non-finite state")
        t, j = min((t, j) for j, t in enumerate(first))
        if t < self.never:
            raise FloatingPointError(
                f"unroll: the iterate became NaN/inf at step t={t} (leaf {self.index[j]} of the "
                f"state, shape {self.shapes[j]}); the step diverged or its loss is non-finite "
                "there: lower the learning rate, or check the loss at that point"
            )


def _checkpointed(step: Step, state: Tree, hparams: Tree, t0: int, n: int, spec: _State,
                  watch: _NonFinite | None) -> Tree:
    """Steps ``t0 .. t0+n-1`` as one autograd node that keeps only its inputs and recomputes the
    steps (with the same RNG state) in its backward."""
    s_flat, s_spec = tree.flatten(state)
    h_flat, h_spec = tree.flatten(hparams)
    s_idx = [i for i, x in enumerate(s_flat) if isinstance(x, torch.Tensor)]
    h_idx = [i for i, x in enumerate(h_flat) if isinstance(x, torch.Tensor)]
    first_run = [True]  # record non-finite iterates in the forward, not in the recomputation

    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s, h = list(s_flat), list(h_flat)
        for i, x in zip(s_idx, tensors[: len(s_idx)]):
            s[i] = x
        for i, x in zip(h_idx, tensors[len(s_idx) :]):
            h[i] = x
        cur, hp = tree.unflatten(s, s_spec), tree.unflatten(h, h_spec)
        for k in range(n):
            cur = step(cur, hp, t0 + k)
            spec.check(cur, t0 + k)
            if watch is not None and first_run[0]:
                watch.see(cur, t0 + k)
        first_run[0] = False
        out = tree.flatten(cur)[0]
        return tuple(out[i] for i in s_idx)

    outs = _Segment.apply(run, *[s_flat[i] for i in s_idx], *[h_flat[i] for i in h_idx])
    s = list(s_flat)
    for i, x in zip(s_idx, outs):
        s[i] = x
    return tree.unflatten(s, spec.spec)


class _Segment(torch.autograd.Function):
    """Checkpointing for steps that differentiate inside themselves (``gradient_step`` calls
    ``torch.autograd.grad``). ``torch.utils.checkpoint(use_reentrant=False)`` re-runs the
    segment from its start every time such an inner backward unpacks a saved tensor, which made
    the forward quadratic in the segment length (20,300 step calls for 200 steps); the reentrant
    variant does not support ``torch.autograd.grad``. Here the forward runs on detached inputs
    (no graph is kept) and the backward recomputes the segment once, then differentiates it."""

    @staticmethod
    def forward(ctx, run, *tensors):  # type: ignore[override]
        ctx.run = run
        ctx.devices = sorted({x.device.index or 0 for x in tensors if x.is_cuda})
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.save_for_backward(*tensors)
        # Like the truncated part of an unroll: grad mode on (a step may differentiate inside
        # itself) but on detached inputs, so no graph outlives the step.
        with torch.enable_grad():
            outs = tuple(run(*[x.detach() for x in tensors]))
        outs = tuple(o.detach() if o.requires_grad else o for o in outs)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):  # type: ignore[override]
        needs = ctx.needs_input_grad[1:]
        create_graph = torch.is_grad_enabled()  # backward(create_graph=True)
        if create_graph:
            # Recompute on aliases of the saved inputs: the gradients built from the recomputed
            # graph stay connected to the inputs' history (double backward works), while
            # differentiating with respect to the aliases (not the inputs themselves) keeps the
            # gradients partial: no path through the inputs' history is counted twice.
            with torch.enable_grad():
                inputs = [x.view_as(x) if x.requires_grad else x for x in ctx.saved_tensors]
        else:
            inputs = [
                x.detach().requires_grad_(need and x.is_floating_point())
                for x, need in zip(ctx.saved_tensors, needs)
            ]
        with torch.random.fork_rng(devices=ctx.devices):
            torch.set_rng_state(ctx.cpu_rng)
            for d, state in zip(ctx.devices, ctx.cuda_rng):
                torch.cuda.set_rng_state(state, d)
            with torch.enable_grad():
                outs = ctx.run(*inputs)
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None and o.requires_grad]
        wanted = [i for i, (x, need) in enumerate(zip(inputs, needs)) if need and x.requires_grad]
        result: list[torch.Tensor | None] = [None] * len(inputs)
        if pairs and wanted:
            grads = torch.autograd.grad(
                [o for o, _ in pairs],
                [inputs[i] for i in wanted],
                [g for _, g in pairs],
                allow_unused=True,
                create_graph=create_graph,
            )
            for i, g in zip(wanted, grads):
                result[i] = g
        return (None, *result)


def _needs_graph(*trees: Tree) -> bool:
    return torch.is_grad_enabled() and any(tree.requires_grad(t) for t in trees)


def _loss_grads(loss: torch.Tensor, p: list[torch.Tensor], create: bool) -> list[Any]:
    # A loss that does not depend on the parameters (or on anything) has zero gradient; it is
    # not an error (torch.autograd.grad would raise "does not require grad").
    if not loss.requires_grad:
        return [None] * len(p)
    return list(torch.autograd.grad(loss, p, create_graph=create, allow_unused=True))


def _param_grads(inner_loss: Callable, params: Tree, hparams: Tree, create: bool):
    """Leaves of ``params`` (made differentiable), d inner_loss / d params (None where unused),
    and the structure spec; keeps the graph iff ``create``."""
    flat, spec = tree.flatten(params)
    with torch.enable_grad():
        p = [x if x.requires_grad else x.detach().requires_grad_(True) for x in flat]
        loss = _checks.scalar_loss(inner_loss(tree.unflatten(p, spec), hparams), "inner_loss")
        grads = _loss_grads(loss, p, create)
    if create:  # differentiating the step later differentiates this gradient: no compiled region
        _checks.check_double_backward(grads, "inner_loss", stop=p + tree.leaves(hparams),
                                      fix=_checks.FORWARD_FIX)
    return p, grads, spec


def gradient_step(inner_loss: Callable[[Tree, Tree], torch.Tensor], lr: float) -> Step:
    """The step ``params - lr * d inner_loss(params, hparams) / d params`` (differentiable).

    The step keeps the graph (``create_graph=True``) only when its inputs are part of one, so
    the same step runs cheaply in the truncated part of an :func:`unroll`. Differentiating it
    needs a double backward: a ``torch.compile``-d ``inner_loss`` raises
    :class:`hypergrad.DoubleBackwardError` when the step is recorded (torch would raise, or drop
    the hyperparameters' path silently, at the backward).
    """
    _checks.callable_(inner_loss, "inner_loss")
    lr = _checks.positive_number(lr, "lr")

    def step(params: Tree, hparams: Tree, t: int) -> Tree:
        create = _needs_graph(params, hparams)
        p, grads, spec = _param_grads(inner_loss, params, hparams, create)
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
        p, grads, spec = _param_grads(inner_loss, params, hparams, create)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(p, grads)]
        updates, opt_state = optimizer.update(
            tree.unflatten(grads, spec), opt_state, params=tree.unflatten(p, spec), inplace=False
        )
        new = torchopt.apply_updates(tree.unflatten(p, spec), updates, inplace=False)
        if not create:
            new, opt_state = tree.detach(new), tree.detach(opt_state)
        return (new, opt_state)

    return step
