"""Second-order products without materialising Hessians.

All products are reverse-over-reverse: the first-order gradient ``g = d fn / d params`` is built
once with ``create_graph=True`` and each product is one more backward pass through it,

    H v            = d <g, v> / d params            (Hessian-vector product)
    v^T d2f/dθdφ   = d <g, v> / d hparams           (mixed vector-Jacobian product)

Measured (benchmarks/RESULTS.md, 1 thread): a matvec that reuses ``g`` costs 1.1-1.2x one
gradient on a 100k-parameter MLP and 1.4-1.5x on a 1M one, which is the multiply-add bound of
an exact Hessian-vector product for those networks and the same as ``torch.func.vjp`` of
``torch.func.grad``; forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``) cost
2.7-7.3x on CPU, so it is not used here.

Example:
    >>> import torch, hypergrad as hg
    >>> f = lambda p: (p["x"] ** 3).sum()
    >>> hg.hvp(f, {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([1.0, 1.0])})["x"]
    tensor([ 6., 12.])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import _checks, tree
from .tree import Tree

__all__ = ["hvp", "make_hvp", "mixed_vjp", "HessianOperator"]


def _grads_or_zeros(
    outputs: list[torch.Tensor],
    inputs: list[torch.Tensor],
    grad_outputs: list[torch.Tensor] | None,
    retain_graph: bool,
) -> list[torch.Tensor]:
    needed = [o for o in outputs if o.requires_grad]
    if not needed:
        return [torch.zeros_like(x) for x in inputs]
    go = None
    if grad_outputs is not None:
        go = [v for o, v in zip(outputs, grad_outputs) if o.requires_grad]
    gs = torch.autograd.grad(
        needed, inputs, grad_outputs=go, retain_graph=retain_graph, allow_unused=True
    )
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


class HessianOperator:
    """The linearisation of ``fn`` at ``params``: ``H @ v`` and mixed products from one graph.

    Built by :func:`make_hvp`. Calling it computes ``(d2 fn / d params2) @ v``. The first-order
    gradient is kept (``.grad``, detached) and so is the loss value (``.value``).
    ``mixed_vjp(v)`` gives ``v^T d2 fn / (d params d hparams)`` when ``hparams`` were given.
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        params: Tree,
        hparams: Tree | None,
        args,
        *,
        name: str = "fn",
    ):
        _checks.callable_(fn, name)
        p_flat = _checks.tensor_tree(params, "params")
        _checks.finite(params, "params")
        self._spec = tree.flatten(params)[1]
        self._params_ref = params
        self._p = [x.detach().requires_grad_(True) for x in p_flat]
        self._h = None
        self._h_spec = None
        call_args: list[Any] = [tree.detach(a) for a in args]
        if hparams is not None:
            h_flat = _checks.tensor_tree(hparams, "hparams")
            _checks.finite(hparams, "hparams")
            h_spec = tree.flatten(hparams)[1]
            self._h = [x.detach().requires_grad_(True) for x in h_flat]
            self._h_spec = h_spec
            call_args = [tree.unflatten(self._h, h_spec), *call_args]
        with torch.enable_grad():
            value = _checks.scalar_loss(fn(tree.unflatten(self._p, self._spec), *call_args), name)
            self.value = value.detach()
            self._g = _grads_or_zeros_create_graph(value, self._p)
        self.grad = tree.unflatten([g.detach() for g in self._g], self._spec)

    def __call__(self, v: Tree) -> Tree:
        v_flat = _checks.like(v, "v", self._params_ref, "params")
        with torch.enable_grad():
            hv = _grads_or_zeros(self._g, self._p, v_flat, retain_graph=True)
        return tree.unflatten(hv, self._spec)

    def mixed_vjp(self, v: Tree) -> Tree:
        if self._h is None:
            raise ValueError(
                "`mixed_vjp` needs `hparams`: build the operator with hparams "
                "(HessianOperator(fn, params, hparams, ()))"
            )
        v_flat = _checks.like(v, "v", self._params_ref, "params")
        with torch.enable_grad():
            out = _grads_or_zeros(self._g, self._h, v_flat, retain_graph=True)
        return tree.unflatten(out, self._h_spec)


def _grads_or_zeros_create_graph(value: torch.Tensor, inputs: list[torch.Tensor]):
    if not value.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    gs = torch.autograd.grad(value, inputs, create_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


def make_hvp(fn: Callable[..., torch.Tensor], params: Tree, *args: Any) -> HessianOperator:
    """A matvec ``v -> (d2 fn(params, *args) / d params2) @ v`` that reuses one gradient graph.

    Use it when you need several products at the same point (a linear solve): the forward and
    first backward run once, each call is one extra backward. ``args`` are passed to ``fn``
    detached (no gradient flows to them).

    Example:
        >>> import torch, hypergrad as hg
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> H = hg.make_hvp(lambda p: 0.5 * p @ A @ p, torch.zeros(2))
        >>> H(torch.tensor([1.0, 0.0]))
        tensor([2., 1.])
    """
    return HessianOperator(fn, params, None, args)


def hvp(fn: Callable[..., torch.Tensor], params: Tree, v: Tree, *args: Any) -> Tree:
    """``(d2 fn(params, *args) / d params2) @ v`` for one ``v`` (see :func:`make_hvp`)."""
    return make_hvp(fn, params, *args)(v)


def mixed_vjp(
    fn: Callable[[Tree, Tree], torch.Tensor], params: Tree, hparams: Tree, v: Tree
) -> Tree:
    """``v^T d2 fn(params, hparams) / (d params d hparams)``, a pytree like ``hparams``.

    Hyperparameters that ``fn`` does not use get zeros (not an error).

    Example:
        >>> import torch, hypergrad as hg
        >>> f = lambda p, h: (h * p ** 2).sum()       # d2f/dp dh = diag(2p)
        >>> hg.mixed_vjp(f, torch.tensor([1.0, 2.0]), torch.ones(2), torch.ones(2))
        tensor([2., 4.])
    """
    return HessianOperator(fn, params, hparams, ()).mixed_vjp(v)
