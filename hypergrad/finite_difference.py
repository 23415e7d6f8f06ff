"""Second-order products from first-order gradients only (central finite differences).

With ``g(θ) = d fn / d params`` and ``g_φ(θ) = d fn / d hparams``, along a direction ``v``:

    H v           ~ [g(θ + εv)   - g(θ - εv)]   / 2ε       (Hessian-vector product)
    v^T d2f/dθdφ  ~ [g_φ(θ + εv) - g_φ(θ - εv)] / 2ε       (mixed vector-Jacobian product)

Each product is two ordinary gradients (one ``torch.autograd.grad`` each, never
``create_graph``): no double backward is ever taken, so the products work for models whose
operations have no second derivative in torch (``F.scaled_dot_product_attention`` on its
flash/memory-efficient kernels, compiled losses, custom autograd functions without a
double-backward), keep no graph alive between products (memory of one gradient) and cost about
two gradients each. The price is a truncation + rounding error, bounded below.

Error bound (central differences, for a product along ``v``, step ``δ = ε ||v||``). With
``M4 = sup ||∇⁴f||`` on the segment ``[θ - εv, θ + εv]`` (the third derivative of the gradient)
and gradients evaluated with relative rounding ``u`` on a computation of scale ``Γ``,

    ||FD(v) - H v|| <= ε² ||v||³ M4 / 6  +  u (Γ + ||H|| ||θ||) / ε
                     = ||v|| (δ² M4 / 6 + u (Γ + ||H|| ||θ||) / δ).

The first term is Taylor's remainder of the odd part of ``g`` (the even terms cancel); the
second is the rounding of the two gradients and of the perturbed points ``θ ± εv``. If ``f``
changes curvature on a length scale ``s`` (``M4 ~ ||H|| / s²``) and ``Γ ≲ ||H|| ||θ||``, the
relative error is ``~ (δ / s)² + κ u ||θ|| / δ`` with ``κ = ||H|| ||v|| / ||H v||``. The
textbook step ``δ = u^(1/3) ||θ||`` assumes ``s ~ ||θ||`` and then gives O(u^(2/3)); but ``s``
can be orders of magnitude below ``||θ||`` (a pre-LayerNorm transformer whose activations are
small: along its validation gradient, ``s ~ 1e-3 ||θ||`` was measured), and then that step's
error is O(1). The default is the robust step

    δ = ε ||v|| = eps · max(1, ||θ||),      eps = sqrt(u)        (default_fd_step)

whose relative error is ``≲ u (||θ|| / s)² + κ sqrt(u)``: at most O(sqrt(u)) (1e-8 in float64,
3e-4 in float32, times κ) for every ``s >= u^(1/4) ||θ||``, degrading gracefully below. ``u``
is ``torch.finfo(dtype).eps`` of the parameters, or of the autocast dtype when the operator is
built inside ``torch.autocast`` (a bfloat16 forward rounds at 2^-8). For a smooth, well-scaled
model in float32, ``eps=torch.finfo(torch.float32).eps ** (1/3)`` can be ~10x more accurate.
The error is proportional to ``||v||`` (the relative error does not depend on the scale of
``v``, as a solver needs), and the truncation term is O(ε²): halving ``eps`` divides it by 4
(tests/test_finite_difference.py checks this on a quartic with a known fourth derivative).

Example:
    >>> import torch, hypergrad as hg
    >>> f = lambda p, h: (h * p ** 3).sum()
    >>> op = hg.FiniteDifferenceOperator(f, torch.tensor([1.0, 2.0], dtype=torch.float64),
    ...                                  torch.tensor([1.0, 1.0], dtype=torch.float64), ())
    >>> op(torch.tensor([1.0, 1.0], dtype=torch.float64)).round(decimals=6).tolist()  # 6 h p v
    [6.0, 12.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import _checks, tree
from .tree import Tree

__all__ = ["FiniteDifferenceOperator", "fd_hvp", "fd_mixed_vjp", "default_fd_step"]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        return None
    return None


def default_fd_step(dtype: torch.dtype) -> float:
    """The relative step ``sqrt(u)`` of the central differences for the rounding ``u =
    torch.finfo(dtype).eps``: 1.5e-8 in float64, 3.5e-4 in float32, 0.088 in bfloat16 (the
    module docstring says why not the textbook ``u^(1/3)``).

    Example:
        >>> import torch
        >>> round(default_fd_step(torch.float32), 6)
        0.000345
    """
    return float(torch.finfo(dtype).eps) ** 0.5


class FiniteDifferenceOperator:
    """``H @ v`` and mixed products of ``fn`` at ``params`` by central differences of gradients.

    The same interface as :class:`hypergrad.HessianOperator` (so every solver works unchanged):
    ``op(v)`` ~ ``(d2 fn / d params2) @ v``, ``op.mixed_vjp(v)`` ~ ``v^T d2 fn / (d params
    d hparams)``, ``op.grad`` (first-order gradient at ``params``, detached) and ``op.value``.
    Each product is ``[g(θ + εv) - g(θ - εv)] / 2ε`` for ``g`` the gradient w.r.t. ``params``
    (for ``op(v)``) or ``hparams`` (for ``mixed_vjp``): two first-order backward passes, never a
    double backward. The step and the error bound are in the module docstring: every
    perturbation has norm ``δ = ε ||v|| = eps * max(1, ||params||)``, with ``eps`` by default
    :func:`default_fd_step` (``sqrt(u)``) of the parameters' dtype, or of the autocast dtype
    when the operator is built inside ``torch.autocast``.

    ``fn`` is called as ``fn(params, hparams, *args)`` (``fn(params, *args)`` without hparams),
    with ``args`` detached; it must be deterministic (fixed batch, fixed dropout mask), and it may
    be a ``torch.compile``-d function. ``.grad`` and ``.value`` are computed on first use (one
    gradient), not at construction, since the products do not need them.

    Example:
        >>> import torch, hypergrad as hg
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> op = hg.FiniteDifferenceOperator(lambda p: 0.5 * p @ A @ p,
        ...                                  torch.ones(2, dtype=torch.float64), None, ())
        >>> torch.allclose(op(torch.tensor([1.0, 0.0], dtype=torch.float64)),
        ...                torch.tensor([2.0, 1.0], dtype=torch.float64))
        True
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        params: Tree,
        hparams: Tree | None,
        args: Any = (),
        *,
        name: str = "fn",
        eps: float | None = None,
    ):
        _checks.callable_(fn, name)
        p_flat = _checks.tensor_tree(params, "params")
        _checks.finite(params, "params")
        self._fn, self._name = fn, name
        self._spec = tree.flatten(params)[1]
        self._params_ref = params
        self._p = [x.detach() for x in p_flat]
        self._args = [tree.detach(a) for a in args]
        self._h: list[torch.Tensor] | None = None
        self._h_spec = None
        if hparams is not None:
            h_flat = _checks.tensor_tree(hparams, "hparams")
            _checks.finite(hparams, "hparams")
            self._h = [x.detach() for x in h_flat]
            self._h_spec = tree.flatten(hparams)[1]
        ref = self._p[0]
        cast = _autocast_dtype(ref.device.type)
        self.compute_dtype = ref.dtype
        if cast is not None and torch.finfo(cast).eps > torch.finfo(ref.dtype).eps:
            self.compute_dtype = cast
        if eps is None:
            eps = default_fd_step(self.compute_dtype)
        self.eps = _checks.positive_number(eps, "eps")
        # the norm of every perturbation ε v: δ = eps * max(1, ||θ||) (a 0-dim tensor, no sync)
        theta_norm = tree.norm(self._p).to(ref.dtype)
        self.step = self.eps * torch.clamp(theta_norm, min=1.0)
        self._checked = False
        self._value: torch.Tensor | None = None
        self._grad: Tree | None = None

    # ------------------------------------------------------------------ first-order pieces
    def _call(self, p: list[torch.Tensor], h: list[torch.Tensor] | None) -> torch.Tensor:
        call_args: list[Any] = list(self._args)
        if h is not None:
            call_args = [tree.unflatten(h, self._h_spec), *call_args]
        value = self._fn(tree.unflatten(p, self._spec), *call_args)
        if not self._checked:  # validate the loss once, on its first evaluation
            _checks.scalar_loss(value, self._name)
            self._checked = True
        return value.reshape(())

    def _gradient(self, p: list[torch.Tensor], wrt_hparams: bool) -> list[torch.Tensor]:
        """``d fn / d params`` (or ``/ d hparams``) at ``p``: one first-order backward."""
        with torch.enable_grad():
            if wrt_hparams:
                assert self._h is not None
                inputs = [x.detach().requires_grad_(True) for x in self._h]
                value = self._call([x.detach() for x in p], inputs)
            else:
                inputs = [x.detach().requires_grad_(True) for x in p]
                value = self._call(inputs, self._h)
            if not value.requires_grad:
                return [torch.zeros_like(x) for x in inputs]
            gs = torch.autograd.grad(value, inputs, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]

    def _central(self, v: Tree, wrt_hparams: bool) -> list[torch.Tensor]:
        v_flat = _checks.like(v, "v", self._params_ref, "params")
        v_norm = tree.norm(v_flat)
        # ε = δ / ||v||; v = 0 gives θ ± 0 and a zero product (no division by zero, no sync)
        eps = self.step / torch.where(v_norm > 0, v_norm, torch.ones_like(v_norm))
        plus = self._gradient([x + eps * d for x, d in zip(self._p, v_flat)], wrt_hparams)
        minus = self._gradient([x - eps * d for x, d in zip(self._p, v_flat)], wrt_hparams)
        return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]

    # ------------------------------------------------------------------ the operator
    def __call__(self, v: Tree) -> Tree:
        return tree.unflatten(self._central(v, wrt_hparams=False), self._spec)

    def mixed_vjp(self, v: Tree) -> Tree:
        if self._h is None:
            raise ValueError(
                "`mixed_vjp` needs `hparams`: build the operator with hparams "
                "(FiniteDifferenceOperator(fn, params, hparams, ()))"
            )
        return tree.unflatten(self._central(v, wrt_hparams=True), self._h_spec)

    @property
    def grad(self) -> Tree:
        """``d fn / d params`` at ``params`` (detached; one gradient on first use)."""
        if self._grad is None:
            with torch.enable_grad():
                inputs = [x.detach().requires_grad_(True) for x in self._p]
                value = self._call(inputs, self._h)
                self._value = value.detach()
                gs = (torch.autograd.grad(value, inputs, allow_unused=True)
                      if value.requires_grad else [None] * len(inputs))
            self._grad = tree.unflatten(
                [torch.zeros_like(x) if g is None else g for x, g in zip(self._p, gs)],
                self._spec)
        return self._grad

    @property
    def value(self) -> torch.Tensor:
        """``fn`` at ``params`` (detached)."""
        if self._value is None:
            with torch.no_grad():
                self._value = self._call(self._p, self._h).detach()
        return self._value


def fd_hvp(fn: Callable[..., torch.Tensor], params: Tree, v: Tree, *args: Any,
           eps: float | None = None) -> Tree:
    """``(d2 fn(params, *args) / d params2) @ v`` by central differences of two gradients
    (see :class:`FiniteDifferenceOperator`); the first-order twin of :func:`hypergrad.hvp`.

    Example:
        >>> import torch, hypergrad as hg
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> hv = hg.fd_hvp(lambda p: (p ** 3).sum(), x, torch.ones(2, dtype=torch.float64))
        >>> hv.round(decimals=6).tolist()                       # 6 p v
        [6.0, 12.0]
    """
    return FiniteDifferenceOperator(fn, params, None, args, eps=eps)(v)


def fd_mixed_vjp(fn: Callable[[Tree, Tree], torch.Tensor], params: Tree, hparams: Tree,
                 v: Tree, *, eps: float | None = None) -> Tree:
    """``v^T d2 fn(params, hparams) / (d params d hparams)`` by central differences of two
    gradients w.r.t. ``hparams``; the first-order twin of :func:`hypergrad.mixed_vjp`."""
    return FiniteDifferenceOperator(fn, params, hparams, (), eps=eps).mixed_vjp(v)
