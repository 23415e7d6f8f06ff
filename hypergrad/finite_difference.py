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

Low precision (the autocast policy): keep ``params``, ``hparams`` and everything a solver holds
(solution, residual, search directions) in float32, and run the model's forward passes under
``torch.autocast(device_type, dtype=torch.bfloat16)``, around the inner training steps and
around the hypergradient call alike. Autocast then runs matmuls, linear layers and attention in
bf16 and leaves the solver's vector arithmetic (elementwise ops, dot products, norms) in
float32, so the solver state and residuals stay float32 with no cast by the user (tested);
every product returns float32. An operator built inside autocast takes its step from bf16's
rounding (``eps = sqrt(2^-7) = 0.088``), which suits models whose curvature lives in the bf16
ops (a tanh MLP: hypergradient error vs float64 at CG J = 10 of 3.8e-2 on the MLP-100k and
9.6e-3 on the MLP-1M, against 1.5e-3 / 2.2e-3 for exact products under the same autocast). It
does not suit a transformer whose curvature lives in the float32 ops autocast leaves alone
(LayerNorm, softmax): there the bf16 step is far too large (product error ~1) and the float32
one (``eps=hg.default_fd_step(torch.float32)``) gives 2.6e-3. For such models compute the
hypergradient outside autocast (float32 forward, two float32 gradients per product) or pass the
step explicitly (``fd_eps=`` of ``implicit_grad`` / ``implicit_solution``, ``eps=`` here).
benchmarks/first_order.py measures all of these.

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
        _checks.tensor_tree(params, "params")
        named: list[tuple[Any, str]] = [(params, "params")]
        if hparams is not None:
            _checks.tensor_tree(hparams, "hparams")
            named.append((hparams, "hparams"))
        _checks.finite_trees(*named)  # one host read for both
        if eps is not None:
            eps = _checks.positive_number(eps, "eps")
        self._setup(fn, params, hparams, args, name, eps, checked=True, inspect=False)

    @classmethod
    def _internal(cls, fn: Callable[..., torch.Tensor], params: Tree, hparams: Tree | None,
                  args: Any = (), *, name: str = "fn", eps: float | None = None,
                  inspect: bool = False, summarize: bool = False) -> FiniteDifferenceOperator:
        """An operator for internal callers that validated their inputs (``eps`` included):
        no checks, no host read, no per-product check of ``v``. Two records give an IFT call
        its health signals without a separate forward or gradient:

        - ``inspect``: the first gradient evaluation records its graph with respect to
          ``params`` and ``hparams`` both and walks it once: ``_params_reached`` (whether
          ``fn`` reaches ``params`` through autograd), ``_captured`` (tensors requiring grad
          it reaches that are neither): the checks ``HessianOperator`` gets from its graph.
        - ``summarize``: the first product along ``params`` summarises the mean of its two
          gradients, ``g(θ) + O(δ²)``: ``_grad_norm`` (0-dim) and ``_grad_finite`` (one flag
          per leaf), kept instead of the gradient itself (no parameter-sized tree held).

        ``_first_value`` is the loss value of the first evaluation (detached), always."""
        op = cls.__new__(cls)
        op._setup(fn, params, hparams, args, name, eps, checked=False, inspect=inspect)
        op._summarize = summarize
        return op

    def _setup(self, fn: Callable[..., torch.Tensor], params: Tree, hparams: Tree | None,
               args: Any, name: str, eps: float | None, checked: bool, inspect: bool) -> None:
        p_flat, self._spec = tree.flatten(params)
        self._fn, self._name = fn, name
        self._params_ref = params
        self._validate_v = checked
        self._p = [x.detach() for x in p_flat]
        self._args = [tree.detach(a) for a in args]
        self._h: list[torch.Tensor] | None = None
        self._h_spec = None
        if hparams is not None:
            h_flat, self._h_spec = tree.flatten(hparams)
            self._h = [x.detach() for x in h_flat]
        ref = self._p[0]
        cast = _autocast_dtype(ref.device.type)
        self.compute_dtype = ref.dtype
        if cast is not None and torch.finfo(cast).eps > torch.finfo(ref.dtype).eps:
            self.compute_dtype = cast
        self.eps = default_fd_step(self.compute_dtype) if eps is None else float(eps)
        # the norm of every perturbation ε v: δ = eps * max(1, ||θ||) (a 0-dim tensor, no sync)
        theta_norm = tree.norm(self._p).to(ref.dtype)
        self.step = self.eps * torch.clamp(theta_norm, min=1.0)
        self._checked = False
        self._value: torch.Tensor | None = None
        self._grad: Tree | None = None
        # internal records (see _internal)
        self._inspect = inspect
        self._summarize = False
        self._params_reached: bool | None = None
        self._captured: list[torch.Tensor] = []
        self._first_value: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None
        self._grad_finite: torch.Tensor | None = None

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
        inspect = self._inspect and self._params_reached is None
        with torch.enable_grad():
            p_in = [x.detach().requires_grad_(inspect or not wrt_hparams) for x in p]
            h_in = self._h
            if h_in is not None and (inspect or wrt_hparams):
                h_in = [x.detach().requires_grad_(True) for x in h_in]
            if wrt_hparams:
                assert h_in is not None
                inputs = h_in
            else:
                inputs = p_in
            value = self._call(p_in, h_in)
            if self._first_value is None:
                self._first_value = value.detach()
            if inspect:  # the one walk of the graph (see _internal)
                reached = _checks.captured_leaves(value, [])
                own = p_in + (h_in or [])
                self._params_reached = any(any(x is r for r in reached) for x in p_in)
                self._captured = [x for x in reached if not any(x is o for o in own)]
            if not value.requires_grad:
                return [torch.zeros_like(x) for x in inputs]
            gs = torch.autograd.grad(value, inputs, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]

    def _central(self, v: Tree, wrt_hparams: bool, mean: bool = False
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The central difference along ``v``, and with ``mean`` also the mean of its two
        gradients, ``[g(θ + εv) + g(θ - εv)] / 2 = g(θ) + O(δ²)`` (for free: no extra
        gradient)."""
        v_flat = (_checks.like(v, "v", self._params_ref, "params") if self._validate_v
                  else tree.leaves(v))
        v_norm = tree.norm(v_flat)
        # ε = δ / ||v||; v = 0 gives θ ± 0 and a zero product (no division by zero, no sync)
        eps = self.step / torch.where(v_norm > 0, v_norm, torch.ones_like(v_norm))
        with torch.no_grad():  # θ + εv, one buffer per leaf, reused for θ - εv below
            point = [torch.addcmul(x, d, eps) for x, d in zip(self._p, v_flat)]
        plus = self._gradient(point, wrt_hparams)
        with torch.no_grad():  # (θ + εv) - 2εv: the graph of `plus` is gone, so in place
            step = -2 * eps
            for x, d in zip(point, v_flat):
                x.addcmul_(d, step)
        minus = self._gradient(point, wrt_hparams)
        del point
        inv = 0.5 / eps
        out: list[torch.Tensor] = []
        avg: list[torch.Tensor] | None = [] if mean else None
        for i in range(len(plus)):  # leaf by leaf, freeing both gradients as we go (peak memory)
            diff = plus[i] - minus[i]
            if avg is not None:  # out of place: a gradient may be an expanded view
                avg.append((plus[i] + minus[i]).mul_(0.5))
            plus[i] = minus[i] = None  # type: ignore[call-overload]
            out.append(diff.mul_(inv))
        return out, avg

    def _product(self, v: Tree) -> list[torch.Tensor]:
        """``H v`` leaves; the first such product summarises its gradient mean for the
        internal health check (see :meth:`_internal`)."""
        keep = self._summarize and self._grad_norm is None
        out, avg = self._central(v, wrt_hparams=False, mean=keep)
        if avg is not None:
            self._summarize_gradient(avg)
        return out

    def _summarize_gradient(self, g: list[torch.Tensor]) -> None:
        self._grad_norm = tree.norm(g)
        # one sum per leaf, not isfinite(x).all() (~40 sums on a CPU): NaN/inf propagate, and
        # a gradient leaf whose sum overflows the dtype counts as overflowed
        self._grad_finite = torch.isfinite(torch.stack([_checks.finite_sum(x) for x in g]))

    def _product_and_gradient(self, v: Tree) -> tuple[Tree, list[torch.Tensor]]:
        """``(H v, g(θ) + O(δ²))`` from one product (two gradients): the stationarity check.
        Its gradient replaces the summary of the first product (the same point, and the
        ``g`` the check is judged on)."""
        out, avg = self._central(v, wrt_hparams=False, mean=True)
        assert avg is not None
        self._summarize_gradient(avg)
        return tree.unflatten(out, self._spec), avg

    # ------------------------------------------------------------------ the operator
    def __call__(self, v: Tree) -> Tree:
        return tree.unflatten(self._product(v), self._spec)

    def mixed_vjp(self, v: Tree) -> Tree:
        if self._h is None:
            raise ValueError(
                "`mixed_vjp` needs `hparams`: build the operator with hparams "
                "(FiniteDifferenceOperator(fn, params, hparams, ()))"
            )
        return tree.unflatten(self._central(v, wrt_hparams=True)[0], self._h_spec)

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
