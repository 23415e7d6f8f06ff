"""Implicit differentiation (IFT) of an inner optimum with respect to hyperparameters.

The invariant: ``params`` is a stationary point of the inner loss, ``d f(params, hparams) /
d params == 0``, with a positive-definite Hessian ``H = d2 f / d params2``. Then the implicit
function theorem gives the best-response Jacobian
    d params* / d hparams = - H^{-1} d2 f / (d params d hparams)            (IFT)
and the hypergradient of an outer loss L(params*, hparams)
    dL/dhparams = dL/dhparams|direct - (d2 f / d hparams d params) H^{-1} dL/dparams.
(Lorraine et al. 2020, Eq. 2-5; Raghu et al. 2021, Eq. 3.) The inverse-Hessian product is a
linear solve handed to ``solver``; the premise is checked and reported, never assumed.

Example:
    >>> import torch, hypergrad as hg
    >>> # inner: f = 0.5 (p - h)^2 has optimum p* = h; outer: L = p^2, so dL/dh = 2 h
    >>> f = lambda p, h: 0.5 * ((p - h) ** 2).sum()
    >>> L = lambda p, h: (p ** 2).sum()
    >>> h = torch.tensor([3.0])
    >>> hg.implicit_grad(f, L, h.clone(), h)
    tensor([6.])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _checks, tree
from .products import HessianOperator
from .solvers import SolveResult, cg
from .transformable import in_functorch_transform
from .tree import Tree

__all__ = ["implicit_grad", "implicit_solution", "HypergradientWarning", "HypergradientError"]

Loss = Callable[[Tree, Tree], torch.Tensor]
_POLICIES = ("warn", "raise", "ignore")


class HypergradientWarning(UserWarning):
    """The IFT premise or the linear solve failed: the hypergradient may be wrong."""


class HypergradientError(RuntimeError):
    """Raised instead of :class:`HypergradientWarning` when ``on_failure="raise"``."""


def _reject_functorch(params: Tree, hparams: Tree) -> None:
    if in_functorch_transform(params) or in_functorch_transform(hparams):
        raise TypeError(
            "implicit_grad / implicit_solution use torch.autograd and cannot run inside "
            "torch.func transforms (vmap, grad, jacrev); use hg.functional_implicit_grad, "
            "which is written in torch.func and composes with them"
        )


def _check_policy(on_failure: str) -> None:
    if on_failure not in _POLICIES:
        raise ValueError(f"`on_failure` must be one of {_POLICIES}, got {on_failure!r}")


def _solve(op: HessianOperator, rhs: Tree, solver: Callable[..., SolveResult]) -> SolveResult:
    res = solver(op, rhs)
    if not isinstance(res, SolveResult):
        raise TypeError(
            f"`solver` must return a hypergrad.SolveResult, got {type(res).__name__}; "
            "wrap your solver or use hg.cg / hg.neumann"
        )
    return res


def _diagnose(
    op: HessianOperator, params: Tree, res: SolveResult, stationarity_tol: float | None
) -> dict[str, Any]:
    """Premise checks: stationarity of ``params`` and positive curvature seen by the solver."""
    info: dict[str, Any] = {"solve": res, "inner_grad_norm": tree.norm(op.grad)}
    reasons = []
    if not bool(res.converged):
        reasons.append("the linear solve did not converge (increase the solver's iterations)")
    stats = res.stats or {}
    nonpos = bool(stats.get("nonpositive_curvature", False))
    info["nonpositive_curvature"] = nonpos
    if nonpos:
        reasons.append("the inner Hessian has non-positive curvature (not at a strict minimum)")
    if stationarity_tol is not None:
        # ||g|| / max(||H p||, ||H p - g||): for a quadratic f = 0.5 p^T H p - b^T p this is the
        # relative residual ||H p - b|| / max(||H p||, ||b||) of the optimality condition;
        # scale-free in f and in params. One extra matvec.
        hp = op(tree.detach(params))
        g = op.grad
        denom = torch.maximum(tree.norm(hp), tree.norm(tree.sub(hp, g)))
        tiny = torch.finfo(denom.dtype).tiny
        stationarity = tree.norm(g) / torch.clamp(denom, min=tiny)
        info["stationarity"] = stationarity
        if not bool(stationarity <= stationarity_tol):
            reasons.append(
                "`params` is not a stationary point of the inner loss (optimise it further)"
            )
    info["reasons"] = reasons
    info["trusted"] = not reasons
    return info


def _report(info: dict[str, Any], on_failure: str) -> None:
    if info["trusted"] or on_failure == "ignore":
        return
    if on_failure == "raise":
        raise HypergradientError("hypergradient may be wrong: " + "; ".join(info["reasons"]))
    # One warning per reason, each with a fixed message, so Python's default filter shows each
    # reason once per call site (a joined message would repeat for every combination).
    for reason in info["reasons"]:
        warnings.warn("hypergradient may be wrong: " + reason, HypergradientWarning, stacklevel=3)


def _check_stationarity_tol(stationarity_tol: float | None) -> None:
    if stationarity_tol is not None:
        _checks.nonneg_number(stationarity_tol, "stationarity_tol")


def implicit_grad(
    inner_loss: Loss,
    outer_loss: Loss,
    params: Tree,
    hparams: Tree,
    *,
    solver: Callable[..., SolveResult] = cg,
    return_info: bool = False,
    on_failure: str = "warn",
    stationarity_tol: float | None = 1e-3,
) -> Tree | tuple[Tree, dict[str, Any]]:
    """Hypergradient ``dL(params*(hparams), hparams) / d hparams`` by the IFT at ``params``.

    Args:
        inner_loss: ``f(params, hparams) -> scalar``; ``params`` must (approximately) minimise it.
        outer_loss: ``L(params, hparams) -> scalar``; may depend on ``hparams`` directly.
        params: the inner optimum (pytree). hparams: pytree of floating tensors. Neither needs
            ``requires_grad``; the function is pure (no ``.grad`` is written).
        solver: ``solver(matvec, b) -> SolveResult``, e.g. ``partial(hg.neumann, iterations=10)``.
        return_info: also return a dict with the ``SolveResult`` (``"solve"``), the inner
            gradient norm, ``"stationarity"`` (relative residual of the optimality condition),
            ``"nonpositive_curvature"`` and ``"trusted"``.
        on_failure: ``"warn"`` (once per reason), ``"raise"`` or ``"ignore"`` when the solve did
            not converge, met non-positive curvature, or ``params`` is not stationary.
        stationarity_tol: threshold on ``"stationarity"``; ``None`` skips the check (saves one
            Hessian-vector product).

    Cost: one gradient graph of ``f``, the solver's matvecs, one mixed product, one gradient
    of ``L``, and one matvec for the stationarity check.
    """
    _reject_functorch(params, hparams)
    _checks.callable_(inner_loss, "inner_loss")
    _checks.callable_(outer_loss, "outer_loss")
    _check_policy(on_failure)
    _check_stationarity_tol(stationarity_tol)
    _checks.callable_(solver, "solver")
    p_flat = _checks.tensor_tree(params, "params")
    h_flat = _checks.tensor_tree(hparams, "hparams")
    _checks.same_dtype(h_flat, "hparams", [p_flat[0]] * len(h_flat), "params")
    op = HessianOperator(inner_loss, params, hparams, (), name="inner_loss")

    p_spec, h_spec = tree.flatten(params)[1], tree.flatten(hparams)[1]
    p = [x.detach().requires_grad_(True) for x in p_flat]
    h = [x.detach().requires_grad_(True) for x in h_flat]
    with torch.enable_grad():
        L = _checks.scalar_loss(
            outer_loss(tree.unflatten(p, p_spec), tree.unflatten(h, h_spec)), "outer_loss"
        )
        grads = torch.autograd.grad(L, p + h, allow_unused=True) if L.requires_grad else None
    if grads is None:
        grads = [None] * (len(p) + len(h))
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(p + h, grads)]
    dL_dp = tree.unflatten(grads[: len(p)], p_spec)
    dL_dh = tree.unflatten(grads[len(p) :], h_spec)

    _checks.finite(dL_dp, "dL/dparams (the gradient of outer_loss)")
    res = _solve(op, dL_dp, solver)  # w = H^{-1} dL/dparams
    mixed = op.mixed_vjp(res.solution)  # w^T d2f/(dparams dhparams)
    hypergrad = tree.sub(dL_dh, mixed)
    info = _diagnose(op, params, res, stationarity_tol)
    _report(info, on_failure)
    return (hypergrad, info) if return_info else hypergrad


class _Implicit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: dict[str, Any], *tensors: torch.Tensor):  # type: ignore[override]
        ctx.cfg = cfg
        ctx.save_for_backward(*tensors)
        return tuple(t.detach().clone() for t in tensors[: cfg["n_params"]])

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):  # type: ignore[override]
        cfg = ctx.cfg
        tensors = ctx.saved_tensors
        n = cfg["n_params"]
        p_flat, h_flat = list(tensors[:n]), list(tensors[n:])
        v = [torch.zeros_like(x) if g is None else g for x, g in zip(p_flat, grad_outputs)]
        params = tree.unflatten(p_flat, cfg["p_spec"])
        hparams = tree.unflatten(h_flat, cfg["h_spec"])
        op = HessianOperator(cfg["inner_loss"], params, hparams, (), name="inner_loss")
        v_tree = tree.unflatten(v, cfg["p_spec"])
        _checks.finite(v_tree, "the gradient arriving at implicit_solution's output")
        res = _solve(op, v_tree, cfg["solver"])
        mixed = tree.leaves(op.mixed_vjp(res.solution))
        info = _diagnose(op, params, res, cfg["stationarity_tol"])
        if cfg["info"] is not None:
            cfg["info"].clear()
            cfg["info"].update(info)
        _report(info, cfg["on_failure"])
        return (None, *([None] * n), *[-m for m in mixed])


def implicit_solution(
    inner_loss: Loss,
    params: Tree,
    hparams: Tree,
    *,
    solver: Callable[..., SolveResult] = cg,
    on_failure: str = "warn",
    stationarity_tol: float | None = 1e-3,
    info: dict[str, Any] | None = None,
) -> Tree:
    """``params``' values as a differentiable function of ``hparams`` (an IFT autograd node).

    The forward returns copies of ``params`` (the inner optimum you computed any way you like);
    the backward maps an incoming ``v = dL/dparams`` to ``-(d2f/dhparams dparams) H^{-1} v``
    into ``hparams``. So the result composes with anything downstream (an unrolled
    fine-tuning, a validation loss) and ``loss.backward()`` fills ``hparams``' ``.grad``.
    No gradient flows into ``params`` themselves. Pass a dict as ``info`` to receive the
    diagnostics of the backward's solve (see :func:`implicit_grad`).

    Example:
        >>> import torch, hypergrad as hg
        >>> h = torch.tensor([3.0], requires_grad=True)
        >>> p_star = hg.implicit_solution(lambda p, h: 0.5 * ((p - h) ** 2).sum(), h.detach(), h)
        >>> (p_star ** 2).sum().backward(); h.grad
        tensor([6.])
    """
    _reject_functorch(params, hparams)
    _checks.callable_(inner_loss, "inner_loss")
    _checks.callable_(solver, "solver")
    _check_policy(on_failure)
    _check_stationarity_tol(stationarity_tol)
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"`info` must be a dict to receive diagnostics, got {type(info).__name__}")
    p_flat, p_spec = tree.flatten(params)
    h_flat, h_spec = tree.flatten(hparams)
    _checks.tensor_tree(params, "params")
    _checks.tensor_tree(hparams, "hparams")
    _checks.same_dtype(h_flat, "hparams", [p_flat[0]] * len(h_flat), "params")
    if not any(x.requires_grad for x in h_flat):
        raise ValueError(
            "`hparams` must require grad for implicit_solution to carry a hypergradient; "
            "call .requires_grad_() on them (or use hg.implicit_grad, which needs none)"
        )
    _checks.finite(params, "params")
    _checks.finite(hparams, "hparams")
    cfg = {
        "inner_loss": inner_loss,
        "solver": solver,
        "n_params": len(p_flat),
        "p_spec": p_spec,
        "h_spec": h_spec,
        "on_failure": on_failure,
        "stationarity_tol": stationarity_tol,
        "info": info,
    }
    out = _Implicit.apply(cfg, *[x.detach() for x in p_flat], *h_flat)
    return tree.unflatten(list(out), p_spec)
