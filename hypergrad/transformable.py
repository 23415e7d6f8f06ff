"""An IFT hypergradient written with torch.func only, so ``vmap``/``jacrev``/``grad`` compose.

:func:`hypergrad.implicit_grad` uses ``torch.autograd.grad`` (fastest: the first-order graph is
built once and reused by every product) and therefore cannot run inside ``torch.func``
transforms. :func:`functional_implicit_grad` computes the same quantity,

    dL/dphi = dL/dphi|direct - (d2f/dphi dtheta) H^{-1} dL/dtheta,

with ``torch.func.vjp`` of ``torch.func.grad`` (reverse-over-reverse; one linearisation reused by
every product) and solver loops with a fixed number of iterations and masked updates (no
branching on tensor values), so it runs under ``torch.func.vmap`` (e.g. per-task hypergradients
or a batch of hyperparameter settings) and can itself be differentiated (``torch.func.jacrev``).

Differentiating the CG solve: the masked CG iterates are homogeneous but not linear in the
right-hand side ``b`` (and not differentiable at ``b = 0``, where they take no step), so
differentiating through them loses the derivative exactly when ``dL/dtheta = 0``. The solve
``x = H(theta, phi)^{-1} b`` has its own derivative rule instead (the IFT of the linear system,
as jaxopt's ``custom_linear_solve``),

    dx = H^{-1} (db - dH x),

evaluated by another masked CG solve, so every derivative (``jacrev``, ``jacfwd``, ``vmap`` of
either, second order) is that of the exact solve for every ``b``, ``b = 0`` included. The rule
needs ``dH``, which also depends on any tensor ``inner_loss`` closes over (data being
differentiated by an outer transform); ``torch.autograd.Function`` cannot see those, so the
solve is split in two: an ``autograd.Function`` for the derivative through its explicit inputs
``(theta, phi, b)``, plus a correction whose value is exactly zero and whose derivative is
``H^{-1}`` applied to the residual ``b - H x`` built with ordinary differentiable operations
(so it carries ``dH`` from everything ``inner_loss`` reads). Cost: one more linearisation and
one more matvec in the forward; two solves per reverse pass. Neumann is linear in ``b`` and is
differentiated through its terms (the exact derivative of the truncated series).

Limitation (torch, not hypergrad): nested forward mode (``jacfwd(jacfwd(...))``) through a
custom ``autograd.Function`` returns wrong higher derivatives (pytorch#197867), so the CG path
raises there; use ``jacrev`` for at least one of the two levels (``torch.func.hessian``, i.e.
``jacfwd(jacrev(...))``, is fine).

Example:
    >>> import torch, hypergrad as hg
    >>> f = lambda p, h: 0.5 * ((p - h) ** 2).sum()   # p* = h
    >>> L = lambda p, h: (p ** 2).sum()                # dL/dh = 2h
    >>> hs = torch.tensor([[1.0], [2.0], [3.0]])
    >>> torch.func.vmap(lambda h: hg.functional_implicit_grad(f, L, h, h))(hs)
    tensor([[2.],
            [4.],
            [6.]])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch._functorch import pyfunctorch

from . import _checks, tree
from ._checks import HypergradientWarning
from .tree import Tree

__all__ = ["functional_implicit_grad", "in_functorch_transform"]


def in_functorch_transform(t: Tree) -> bool:
    """Whether any tensor leaf of ``t`` is being traced by a torch.func transform."""
    return any(
        isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)
        for x in tree.leaves(t)
    )


def _any_transform_active() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def _masked_cg(mv: Callable[[Tree], Tree], b: Tree, iterations: int, tol: float) -> Tree:
    """CG with exactly ``iterations`` matvecs; converged lanes stop updating (masked)."""
    x = tree.zeros_like(b)
    r = p = b
    rs = tree.vdot(r, r)
    threshold = (tol**2) * rs
    for _ in range(iterations):
        ap = mv(p)
        pap = tree.vdot(p, ap)
        active = rs > threshold
        safe_pap = torch.where(pap != 0, pap, torch.ones_like(pap))
        step = torch.where(active, rs / safe_pap, torch.zeros_like(rs))
        x = tree.axpy(step, p, x)
        r = tree.axpy(-step, ap, r)
        rs_new = tree.vdot(r, r)
        safe_rs = torch.where(rs != 0, rs, torch.ones_like(rs))
        beta = torch.where(active, rs_new / safe_rs, torch.zeros_like(rs))
        p = tree.axpy(beta, p, r)
        rs = torch.where(active, rs_new, rs)
    return x


def _neumann(mv: Callable[[Tree], Tree], b: Tree, iterations: int, alpha: float) -> Tree:
    p = acc = b
    for _ in range(iterations - 1):
        p = tree.axpy(-alpha, mv(p), p)
        acc = tree.add(acc, p)
    return tree.scale(acc, alpha)


class _Cfg:
    """The solve's static configuration: a plain object (not a pytree), so the generated vmap
    rules of the autograd.Functions below pass it through untouched."""

    def __init__(self, inner_loss: Callable, damping: float, iterations: int, tol: float,
                 p_spec: Any, h_spec: Any, n: int, m: int) -> None:
        self.inner_loss, self.damping = inner_loss, damping
        self.iterations, self.tol = iterations, tol
        self.p_spec, self.h_spec, self.n, self.m = p_spec, h_spec, n, m

    def split(self, ts) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        ts = list(ts)
        return ts[: self.n], ts[self.n : self.n + self.m], ts[self.n + self.m :]


def _linearise(inner_loss: Callable, params: Tree, hparams: Tree):
    """``v -> (H v, (d2f/dp dh)^T v)`` from one ``torch.func.vjp`` of the inner gradient."""
    return torch.func.vjp(torch.func.grad(inner_loss, argnums=0), params, hparams)[1]


def _hessian_mv(lin, damping: float) -> Callable[[Tree], Tree]:
    def mv(v: Tree) -> Tree:
        hv = lin(v)[0]
        return tree.axpy(damping, v, hv) if damping else hv

    return mv


def _h_times(cfg: _Cfg, x: list[torch.Tensor]):
    """``(p_leaves, h_leaves) -> leaves of (H(p, h) + damping I) x`` for a fixed ``x``."""

    def hx(p: list[torch.Tensor], h: list[torch.Tensor]) -> list[torch.Tensor]:
        lin = _linearise(cfg.inner_loss, tree.unflatten(p, cfg.p_spec),
                         tree.unflatten(h, cfg.h_spec))
        return tree.leaves(_hessian_mv(lin, cfg.damping)(tree.unflatten(x, cfg.p_spec)))

    return hx


def _no_nested_forward(name: str) -> None:
    # inside a jvp rule its own Jvp level is on the stack; a second one means this rule is
    # itself being differentiated in forward mode (pytorch#197867)
    if sum(i.key() == pyfunctorch.TransformType.Jvp
           for i in pyfunctorch.retrieve_all_functorch_interpreters()) > 1:
        raise NotImplementedError(
            f"functional_implicit_grad: nested forward mode (jacfwd/jvp of jacfwd/jvp) through "
            f"the CG solve ({name}) would be silently wrong in torch (pytorch#197867); use "
            "torch.func.jacrev for one of the two levels (torch.func.hessian is fine), or "
            "solver='neumann'"
        )


class _Solve(torch.autograd.Function):
    """``x = (H(p, h) + damping I)^{-1} b`` by masked CG; the derivative with respect to the
    explicit inputs ``(p, h, b)`` is the IFT of the linear system, at every order."""

    generate_vmap_rule = True

    @staticmethod
    def forward(cfg: _Cfg, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        p, h, b = cfg.split(ts)
        lin = _linearise(cfg.inner_loss, tree.unflatten(p, cfg.p_spec),
                         tree.unflatten(h, cfg.h_spec))
        x = _masked_cg(_hessian_mv(lin, cfg.damping), tree.unflatten(b, cfg.p_spec),
                       cfg.iterations, cfg.tol)
        return tuple(tree.leaves(x))

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        cfg, *ts = inputs
        ctx.cfg = cfg
        k = cfg.n + cfg.m
        ctx.save_for_backward(*ts[:k], *output)
        ctx.save_for_forward(*ts[:k], *output)

    @staticmethod
    def backward(ctx, *gx: torch.Tensor):  # type: ignore[override]
        cfg = ctx.cfg
        p, h, x = cfg.split(ctx.saved_tensors)
        gx = [torch.zeros_like(xi) if g is None else g for xi, g in zip(x, gx)]
        b_bar = list(_Solve.apply(cfg, *p, *h, *gx))  # H^{-1} gx (H symmetric)
        _, vjp = torch.func.vjp(_h_times(cfg, x), p, h)
        p_bar, h_bar = vjp([-b for b in b_bar])  # -(d(H x)/d(p, h))^T b_bar
        return (None, *p_bar, *h_bar, *b_bar)

    @staticmethod
    def jvp(ctx, _cfg_tangent, *tangents: torch.Tensor):  # type: ignore[override]
        _no_nested_forward("jvp")
        cfg = ctx.cfg
        p, h, x = cfg.split(ctx.saved_tensors)
        t = [torch.zeros_like(y) if d is None else d for y, d in zip(p + h + x, tangents)]
        tp, th, tb = cfg.split(t)
        _, hx_dot = torch.func.jvp(_h_times(cfg, x), (p, h), (tp, th))
        return _Solve.apply(cfg, *p, *h, *[db - d for db, d in zip(tb, hx_dot)])


class _InverseOfZero(torch.autograd.Function):
    """Value ``0`` (it is applied to a residual that is exactly zero in value), derivative
    ``dr -> (H + damping I)^{-1} dr``: carries the part of ``dx = H^{-1}(db - dH x)`` that comes
    through tensors the inner loss closes over."""

    generate_vmap_rule = True

    @staticmethod
    def forward(cfg: _Cfg, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return tuple(torch.zeros_like(r) for r in cfg.split(ts)[2])

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        cfg, *ts = inputs
        ctx.cfg = cfg
        k = cfg.n + cfg.m
        ctx.save_for_backward(*ts[:k])
        ctx.save_for_forward(*ts[:k])

    @staticmethod
    def _inverse(ctx, g) -> list[torch.Tensor]:
        cfg = ctx.cfg
        p, h, _ = cfg.split(ctx.saved_tensors)
        g = [torch.zeros_like(y) if d is None else d for y, d in zip(p, g)]
        return _solve_leaves(cfg, p, h, g)

    @staticmethod
    def backward(ctx, *g: torch.Tensor):  # type: ignore[override]
        cfg = ctx.cfg
        return (None, *([None] * (cfg.n + cfg.m)), *_InverseOfZero._inverse(ctx, g))

    @staticmethod
    def jvp(ctx, _cfg_tangent, *tangents: torch.Tensor):  # type: ignore[override]
        _no_nested_forward("jvp of the correction")
        k = ctx.cfg.n + ctx.cfg.m
        return tuple(_InverseOfZero._inverse(ctx, tangents[k:]))


def _solve_leaves(cfg: _Cfg, p: list[torch.Tensor], h: list[torch.Tensor],
                  b: list[torch.Tensor], lin=None) -> list[torch.Tensor]:
    """Leaves of ``(H + damping I)^{-1} b`` with exact derivatives (module docstring)."""
    x = list(_Solve.apply(cfg, *p, *h, *b))
    if lin is None:
        lin = _linearise(cfg.inner_loss, tree.unflatten(p, cfg.p_spec),
                         tree.unflatten(h, cfg.h_spec))
    hx = tree.leaves(_hessian_mv(lin, cfg.damping)(tree.unflatten(x, cfg.p_spec)))
    residual = [bi - ai for bi, ai in zip(b, hx)]  # ~0 in value; carries db - dH x - H dx
    correction = _InverseOfZero.apply(cfg, *p, *h, *residual)
    return [xi + ci for xi, ci in zip(x, correction)]


def _scalar(fn: Callable, name: str) -> Callable:
    def checked(p: Tree, h: Tree) -> torch.Tensor:
        return _checks.scalar_loss(fn(p, h), name)

    return checked


def functional_implicit_grad(
    inner_loss: Callable[[Tree, Tree], torch.Tensor],
    outer_loss: Callable[[Tree, Tree], torch.Tensor],
    params: Tree,
    hparams: Tree,
    *,
    solver: str = "cg",
    iterations: int = 20,
    tol: float = 1e-10,
    alpha: float = 1.0,
    damping: float = 0.0,
) -> Tree:
    """IFT hypergradient composable with torch.func transforms (see module docstring).

    ``solver`` is ``"cg"`` (``iterations`` masked CG steps, lanes stop at ``||r|| <= tol ||b||``;
    derivatives by the IFT of the solve, exact for every right-hand side) or ``"neumann"``
    (``iterations`` terms, step ``alpha``; differentiated through its terms). Exactly
    ``iterations`` products are spent whatever the data, which is what makes it batchable. No
    diagnostics are returned (they would be data-dependent); check a representative case with
    :func:`hypergrad.implicit_grad` and ``return_info=True``.

    Checks: structure, dtypes and devices of ``params`` and ``hparams`` and the scalar losses
    always (no value is read); outside any torch.func transform also NaN/inf in the inputs, the
    losses and the outer gradient (``ValueError`` naming which, one host read), and a warning
    when the result is NaN/inf although they are finite. Under a transform values cannot be
    read, so NaN in gives NaN out there.
    """
    _checks.callable_(inner_loss, "inner_loss")
    _checks.callable_(outer_loss, "outer_loss")
    iterations = _checks.positive_int(iterations, "iterations")
    tol = _checks.nonneg_number(tol, "tol")
    damping = _checks.nonneg_number(damping, "damping")
    if solver not in ("cg", "neumann"):
        raise ValueError(
            f"`solver` must be 'cg' or 'neumann' for functional_implicit_grad, got {solver!r} "
            "(the callable solvers of hypergrad branch on convergence and cannot be vmapped)"
        )
    alpha = _checks.positive_number(alpha, "alpha")
    p_flat, p_spec = tree.flatten(params)
    h_flat, h_spec = tree.flatten(hparams)
    _checks.tensor_tree(params, "params")
    _checks.tensor_tree(hparams, "hparams")
    _checks.one_device(p_flat, "params")
    _checks.same_dtype(h_flat, "hparams", [p_flat[0]] * len(h_flat), "params")
    inner = _scalar(inner_loss, "inner_loss")
    outer = _scalar(outer_loss, "outer_loss")

    def grad_and_value(p: Tree, h: Tree):
        g, value = torch.func.grad(lambda a, b: (lambda v: (v, v))(inner(a, b)),
                                   has_aux=True)(p, h)
        return g, value

    # one linearisation of (p, h) -> d f / d p, reused by every product:
    # lin(v) = (H v, (d2f / dp dh)^T v)   (H is symmetric)
    _, lin, inner_value = torch.func.vjp(grad_and_value, params, hparams, has_aux=True)
    (dL_dp, dL_dh), outer_value = torch.func.grad_and_value(outer, argnums=(0, 1))(params,
                                                                                    hparams)
    if solver == "cg":
        cfg = _Cfg(inner, damping, iterations, tol, p_spec, h_spec, len(p_flat), len(h_flat))
        w = tree.unflatten(_solve_leaves(cfg, p_flat, h_flat, tree.leaves(dL_dp), lin), p_spec)
    else:
        w = _neumann(_hessian_mv(lin, damping), dL_dp, iterations, alpha)
    mixed = lin(w)[1]
    out = tree.sub(dL_dh, mixed)
    if not _any_transform_active():
        _check_values(p_flat, h_flat, inner_value, outer_value, dL_dp, dL_dh, out)
    return out


def _check_values(p_flat, h_flat, inner_value, outer_value, dL_dp, dL_dh, out) -> None:
    """Outside transforms: NaN/inf anywhere, named, in one host read."""
    health = _checks.Health()
    health.add_finite("params", p_flat)
    health.add_finite("hparams", h_flat)
    health.add_finite("inner", [inner_value])
    health.add_finite("outer", [outer_value])
    health.add_finite("dL_dp", tree.leaves(dL_dp))
    health.add_finite("dL_dh", tree.leaves(dL_dh))
    health.add_finite("out", tree.leaves(out))
    health.read()
    health.raise_nonfinite("params", p_flat)
    health.raise_nonfinite("hparams", h_flat)
    if health.first_nonfinite("inner") is not None:
        raise ValueError("the value of `inner_loss` at `params` is NaN/inf; fix the inner loss")
    if health.first_nonfinite("outer") is not None:
        raise ValueError("the value of `outer_loss` at `params` is NaN/inf; fix the outer loss")
    for key, what in (("dL_dp", "params"), ("dL_dh", "hparams")):
        i = health.first_nonfinite(key)
        if i is not None:
            raise ValueError(f"the gradient of `outer_loss` with respect to `{what}` leaf {i} "
                             "is NaN/inf (e.g. sqrt or log at 0)")
    if health.first_nonfinite("out") is not None:
        warnings.warn(
            "functional_implicit_grad returned NaN/inf although its inputs, losses and outer "
            "gradient are finite: the inner Hessian is singular or indefinite, or the Neumann "
            "series diverged (alpha too large); check with hg.implicit_grad(..., "
            "return_info=True), or add damping=", HypergradientWarning, stacklevel=3)
