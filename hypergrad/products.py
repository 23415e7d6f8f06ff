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

Validation and host synchronisations: the one-shot :func:`hvp` and :func:`mixed_vjp` check
everything (structure, dtype, and NaN/inf in ``params``, ``v``, the loss, its gradient and
the product) with one device read. :func:`make_hvp` checks ``params``, the loss and its
gradient once, when it is built (one read); its products check only the structure, shape and
dtype of ``v`` (free), never its values, so a solver loop over them pays no synchronisation
per product (a NaN ``v`` gives a NaN product, which the solvers report in their residual).
A loss with no autograd path to ``params`` raises instead of giving zero products.

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
    grad_outputs: list[torch.Tensor],
    name: str,
) -> list[torch.Tensor]:
    pairs = [(o, v) for o, v in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs:  # the gradient is constant in the inputs: a zero (not a missing) derivative
        return [torch.zeros_like(x) for x in inputs]
    with _checks.second_order(name):
        gs = torch.autograd.grad(
            [o for o, _ in pairs], inputs, grad_outputs=[v for _, v in pairs],
            retain_graph=True, allow_unused=True,
        )
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


def _no_path_error(name: str) -> ValueError:
    return ValueError(
        f"`{name}` does not depend on `params` through autograd: its value has no gradient path "
        "to any leaf of `params`, so every second-order product would be zero. Look for a "
        ".detach(), .item(), .numpy(), torch.no_grad() or a tensor rebuilt from values inside "
        f"`{name}`, or a loss that reads a copy of the parameters (e.g. the module's own "
        "weights) instead of the `params` it is given"
    )


class HessianOperator:
    """The linearisation of ``fn`` at ``params``: ``H @ v`` and mixed products from one graph.

    Built by :func:`make_hvp`. Calling it computes ``(d2 fn / d params2) @ v``. The first-order
    gradient is kept (``.grad``, detached) and so is the loss value (``.value``).
    ``mixed_vjp(v)`` gives ``v^T d2 fn / (d params d hparams)`` when ``hparams`` were given.

    Building it validates ``params`` / ``hparams`` and checks that the loss value and its
    gradient are finite (one host read); each product then checks only the structure, shapes
    and dtype of ``v`` (no host read). Raises ``hypergrad.DoubleBackwardError`` when the
    loss has an operation with no double backward, or runs through a ``torch.compile``-d
    region (whose exact products would otherwise read as zeros): use finite-difference
    products then (:class:`hypergrad.FiniteDifferenceOperator`).
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
        _checks.one_device(p_flat, "params")
        if hparams is not None:
            h_flat = _checks.tensor_tree(hparams, "hparams")
            _checks.one_device(h_flat, "hparams")
        self._build(fn, params, hparams, args, name, checked=True)
        health = _checks.Health()
        self._add_health(health)
        health.read()
        self._raise_nonfinite(health)

    @classmethod
    def _internal(
        cls, fn: Callable[..., torch.Tensor], params: Tree, hparams: Tree | None, args=(),
        *, name: str = "fn",
    ) -> HessianOperator:
        """An operator for internal callers that validated their inputs: no host read at all
        (the caller folds :meth:`_add_health` into its own one read) and no per-product checks.
        Still raises (for free) on a non-scalar loss or one with no autograd path to params."""
        op = cls.__new__(cls)
        op._build(fn, params, hparams, args, name, checked=False)
        return op

    def _build(self, fn, params: Tree, hparams: Tree | None, args, name: str,
               checked: bool) -> None:
        p_flat, self._spec = tree.flatten(params)
        self._name = name
        self._checked = checked
        self._params_ref = params
        self._p = [x.detach().requires_grad_(True) for x in p_flat]
        self._h: list[torch.Tensor] | None = None
        self._h_spec = None
        call_args: list[Any] = [tree.detach(a) for a in args]
        if hparams is not None:
            h_flat, self._h_spec = tree.flatten(hparams)
            self._h = [x.detach().requires_grad_(True) for x in h_flat]
            call_args = [tree.unflatten(self._h, self._h_spec), *call_args]
        with torch.enable_grad():
            value = _checks.scalar_loss(fn(tree.unflatten(self._p, self._spec), *call_args), name)
            if not value.requires_grad:
                raise _no_path_error(name)
            with _checks.second_order(name):
                gs = torch.autograd.grad(value, self._p, create_graph=True, allow_unused=True)
        if all(g is None for g in gs):
            raise _no_path_error(name)
        _checks.check_double_backward(gs, name)  # a compiled region: raise, never zeros
        _checks.check_once_differentiable(value, self._p, name)
        self._loss = value  # with its graph: for the check of captured tensors
        self.value = value.detach()
        self._g = [torch.zeros_like(x) if g is None else g for x, g in zip(self._p, gs)]
        self.grad = tree.unflatten([g.detach() for g in self._g], self._spec)

    # ---- health: gathered by the caller, read once ------------------------------------------
    def _add_health(self, health: _checks.Health) -> None:
        health.add_finite("params", self._p)
        if self._h is not None:
            health.add_finite("hparams", self._h)
        health.add_finite("loss", [self.value])
        health.add_finite("loss_grad", self._g)

    def _raise_nonfinite(self, health: _checks.Health) -> None:
        """``ValueError`` naming the first non-finite signal, in causal order."""
        _raise_nonfinite(health, self._name, self._p, self._h)

    def captured(self) -> list[torch.Tensor]:
        """Tensors that ``fn`` used, that require grad, but are neither params nor hparams."""
        own = self._p + (self._h or [])
        return _checks.captured_leaves(self._loss, own)

    # ---- products -----------------------------------------------------------------------------
    def _v(self, v: Tree) -> list[torch.Tensor]:
        if self._checked:
            return _checks.like(v, "v", self._params_ref, "params")
        return tree.leaves(v)

    def __call__(self, v: Tree) -> Tree:
        v_flat = self._v(v)
        with torch.enable_grad():
            hv = _grads_or_zeros(self._g, self._p, v_flat, self._name)
        return tree.unflatten(hv, self._spec)

    def mixed_vjp(self, v: Tree) -> Tree:
        if self._h is None:
            raise ValueError(
                "`mixed_vjp` needs `hparams`: build the operator with hparams "
                "(HessianOperator(fn, params, hparams, ()))"
            )
        v_flat = self._v(v)
        with torch.enable_grad():
            out = _grads_or_zeros(self._g, self._h, v_flat, self._name)
        return tree.unflatten(out, self._h_spec)


def _raise_nonfinite(health: _checks.Health, name: str, p: list[torch.Tensor],
                     h: list[torch.Tensor] | None) -> None:
    """The checks of :meth:`HessianOperator._raise_nonfinite` on the keys ``params``,
    ``hparams``, ``loss`` and ``loss_grad`` (shared with the finite-difference products, which
    evaluate the loss and its gradient within their step of ``params``)."""
    health.raise_nonfinite("params", p)
    if h is not None:
        health.raise_nonfinite("hparams", h)
    if health.first_nonfinite("loss") is not None:
        raise ValueError(
            f"the value of `{name}` at `params` is NaN/inf (while `params`"
            f"{' and `hparams`' if h is not None else ''} are finite): fix the loss "
            "(e.g. a log of 0, an overflow, a NaN in the data it closes over)"
        )
    i = health.first_nonfinite("loss_grad")
    if i is not None:
        raise ValueError(
            f"the gradient of `{name}` with respect to `params` leaf {i} (shape "
            f"{tuple(p[i].shape)}) is NaN/inf although the loss value is finite "
            "(e.g. sqrt or log at 0, or an overflow in the backward pass)"
        )


def make_hvp(fn: Callable[..., torch.Tensor], params: Tree, *args: Any) -> HessianOperator:
    """A matvec ``v -> (d2 fn(params, *args) / d params2) @ v`` that reuses one gradient graph.

    Use it when you need several products at the same point (a linear solve): the forward and
    first backward run once, each call is one extra backward. ``args`` are passed to ``fn``
    detached (no gradient flows to them). ``params``, the loss and its gradient are checked for
    NaN/inf once, here; the products check ``v``'s structure, shape and dtype but not its values
    (no device synchronisation per product).

    Example:
        >>> import torch, hypergrad as hg
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> H = hg.make_hvp(lambda p: 0.5 * p @ A @ p, torch.zeros(2))
        >>> H(torch.tensor([1.0, 0.0]))
        tensor([2., 1.])
    """
    return HessianOperator(fn, params, None, args)


def _one_shot(fn, params: Tree, hparams: Tree | None, v: Tree, args, mixed: bool) -> Tree:
    """Validate everything, compute one product, read every NaN/inf flag in one transfer."""
    _checks.callable_(fn, "fn")
    p_flat = _checks.tensor_tree(params, "params")
    _checks.one_device(p_flat, "params")
    if hparams is not None:
        _checks.one_device(_checks.tensor_tree(hparams, "hparams"), "hparams")
    v_flat = _checks.like(v, "v", params, "params")
    op = HessianOperator._internal(fn, params, hparams, args, name="fn")
    out = op.mixed_vjp(v) if mixed else op(v)
    health = _checks.Health()
    op._add_health(health)
    health.add_finite("v", v_flat)
    health.add_finite("product", tree.leaves(out))
    health.read()
    health.raise_nonfinite("params", p_flat)
    health.raise_nonfinite("v", v_flat)
    op._raise_nonfinite(health)
    if health.first_nonfinite("product") is not None:
        raise ValueError(
            "the product is NaN/inf although `params`, `v`, the loss and its gradient are "
            "finite: the second derivative of `fn` overflows or is undefined at `params`"
        )
    return out


def hvp(fn: Callable[..., torch.Tensor], params: Tree, v: Tree, *args: Any) -> Tree:
    """``(d2 fn(params, *args) / d params2) @ v`` for one ``v`` (see :func:`make_hvp`).

    Checks everything once (one device read): NaN/inf in ``params``, ``v``, the loss, its
    gradient or the product raise a ``ValueError`` that names which."""
    return _one_shot(fn, params, None, v, args, mixed=False)


def mixed_vjp(
    fn: Callable[[Tree, Tree], torch.Tensor], params: Tree, hparams: Tree, v: Tree
) -> Tree:
    """``v^T d2 fn(params, hparams) / (d params d hparams)``, a pytree like ``hparams``.

    Hyperparameters that ``fn`` does not use get zeros (not an error). Checked like :func:`hvp`.
    A ``torch.compile``-d ``fn`` has no double backward: ``DoubleBackwardError`` (use
    :func:`hypergrad.fd_mixed_vjp`).

    Example:
        >>> import torch, hypergrad as hg
        >>> f = lambda p, h: (h * p ** 2).sum()       # d2f/dp dh = diag(2p)
        >>> hg.mixed_vjp(f, torch.tensor([1.0, 2.0]), torch.ones(2), torch.ones(2))
        tensor([2., 4.])
    """
    return _one_shot(fn, params, hparams, v, (), mixed=True)
