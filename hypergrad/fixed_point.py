"""Implicit differentiation of a fixed point ``x* = T(x*, hparams)`` (DEQ layers, proximal steps).

The invariant: ``x`` satisfies ``T(x, hparams) == x`` and ``I - dT/dx`` is invertible there.
Differentiating the invariant gives ``dx*/dh = (I - dT/dx)^{-1} dT/dh``, so an outer loss
``L(x*, h)`` has the hypergradient

    dL/dh = dL/dh|direct + (dT/dh)^T (I - dT/dx)^{-T} dL/dx.

The transposed system ``(I - dT/dx)^T w = dL/dx`` is not symmetric, so the default solver is
``hg.gmres``; each matvec is one vector-Jacobian product of ``T`` through one recorded graph.
The premise is checked and reported, never assumed: is ``x`` a fixed point (the relative residual
``||T(x) - x|| / max(||x||, ||T(x)||)``), did the solve converge, and is ``T`` contractive
along the solve (the largest ``||dT/dx^T v|| / ||v||`` over the solver's vectors ``v``, a
lower bound on ``||dT/dx||_2``; at >= 1 a fixed-point iteration need not converge to ``x``).

Example:
    >>> import torch, hypergrad as hg
    >>> T = lambda x, h: 0.5 * x + h           # x* = 2 h
    >>> L = lambda x, h: (x ** 2).sum()        # dL/dh = 2 x* dx*/dh = 8 h
    >>> h = torch.tensor([1.5], dtype=torch.float64)
    >>> hg.fixed_point_grad(T, L, 2 * h, h).tolist()
    [12.0]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _checks, tree
from .implicit import HypergradientError, HypergradientWarning
from .solvers import SolveResult, gmres
from .transformable import in_functorch_transform
from .tree import Tree

__all__ = ["fixed_point_grad", "fixed_point_solution"]

FixedPointMap = Callable[[Tree, Tree], Tree]
Loss = Callable[[Tree, Tree], torch.Tensor]
_POLICIES = ("warn", "raise", "ignore")


# --- shared with forward.py: the failure policy and the entry checks -----------------------------
def _check_policy(on_failure: str) -> None:
    if on_failure not in _POLICIES:
        raise ValueError(f"`on_failure` must be one of {_POLICIES}, got {on_failure!r}")


def _report(reasons: list[str], on_failure: str, stacklevel: int = 3) -> None:
    """Warn once per reason (each a fixed message, so Python's filter shows it once per call
    site), raise :class:`HypergradientError` with all of them, or stay silent."""
    if not reasons or on_failure == "ignore":
        return
    if on_failure == "raise":
        raise HypergradientError("hypergradient may be wrong: " + "; ".join(reasons))
    for reason in reasons:
        warnings.warn(
            "hypergradient may be wrong: " + reason, HypergradientWarning, stacklevel=stacklevel
        )


def _reject_functorch(name: str, *trees: Tree) -> None:
    if any(in_functorch_transform(t) for t in trees):
        raise TypeError(
            f"{name} uses torch.autograd and cannot run inside torch.func transforms (vmap, "
            "grad, jacrev); call it outside the transform"
        )


def _call_solver(solver: Callable[..., SolveResult], matvec, rhs: Tree) -> SolveResult:
    res = solver(matvec, rhs)
    if not isinstance(res, SolveResult):
        raise TypeError(
            f"`solver` must return a hypergrad.SolveResult, got {type(res).__name__}; "
            "wrap your solver or use hg.gmres / hg.cg"
        )
    return res


def _captured(outputs: list[torch.Tensor], known: list[torch.Tensor]) -> list[torch.Tensor]:
    """Leaf tensors requiring grad that ``outputs`` depend on but that are not in ``known``:
    tensors a user function captured (a closure over a module's weights, say). Their gradient
    is not part of any hypergradient, which is silently wrong if they were meant as hparams."""
    known_ids = {id(t) for t in known}
    stack = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    seen: set = set()
    found: list[torch.Tensor] = []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
        if var is not None:
            if id(var) not in known_ids:
                found.append(var)
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return found


def _captured_reason(name: str, found: list[torch.Tensor], args: str) -> str:
    shapes = ", ".join(str(tuple(t.shape)) for t in found[:5]) + (" ..." if len(found) > 5 else "")
    return (f"`{name}` uses {len(found)} tensor(s) that require grad but are in neither {args} "
            f"(shapes {shapes}); their gradients are not part of the result: pass them in "
            "`hparams` or detach them")


def _relative(num: torch.Tensor, *scales: torch.Tensor) -> torch.Tensor:
    denom = scales[0]
    for s in scales[1:]:
        denom = torch.maximum(denom, s)
    return num / torch.clamp(denom, min=torch.finfo(denom.dtype).tiny)


# --- the linearisation of T ---------------------------------------------------------------------
class _Linearized:
    """``T`` recorded once at ``(x, h)``: ``(I - dT/dx)^T v`` and ``(dT/dh)^T w`` by backward
    passes through that graph. Tracks ``max ||dT/dx^T v|| / ||v||`` over the matvecs (a tensor:
    no host synchronisation per product)."""

    def __init__(self, fixed_point_map: FixedPointMap, x: Tree, hparams: Tree):
        x_flat, self.x_spec = tree.flatten(x)
        h_flat, self.h_spec = tree.flatten(hparams)
        self.x = [t.detach().requires_grad_(True) for t in x_flat]
        self.h = [t.detach().requires_grad_(True) for t in h_flat]
        with torch.enable_grad():
            out = fixed_point_map(
                tree.unflatten(self.x, self.x_spec), tree.unflatten(self.h, self.h_spec)
            )
        _check_map_output(out, x)
        self.out = tree.leaves(out)
        self.captured = _captured(self.out, self.x + self.h)
        with torch.no_grad():
            self.residual = _relative(
                tree.norm([o - t for o, t in zip(self.out, self.x)]),
                tree.norm(self.x),
                tree.norm(self.out),
            )
        ref = self.x[0]
        self.max_ratio = torch.zeros((), dtype=ref.dtype, device=ref.device)
        self.matvecs = 0

    def _vjp(self, inputs: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
        pairs = [(o, g) for o, g in zip(self.out, v) if o.requires_grad]
        if not pairs:
            return [torch.zeros_like(t) for t in inputs]
        with torch.enable_grad():
            gs = torch.autograd.grad(
                [o for o, _ in pairs], inputs, [g for _, g in pairs],
                retain_graph=True, allow_unused=True,
            )
        return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, gs)]

    def __call__(self, v: Tree) -> Tree:
        """``v - (dT/dx)^T v``."""
        v_flat = tree.leaves(v)
        jv = self._vjp(self.x, v_flat)
        ratio = _relative(tree.norm(jv), tree.norm(v_flat))
        self.max_ratio = torch.maximum(self.max_ratio, ratio)
        self.matvecs += 1
        return tree.unflatten([a - b for a, b in zip(v_flat, jv)], self.x_spec)

    def mixed(self, w: Tree) -> Tree:
        """``(dT/dh)^T w``, a pytree like ``hparams``."""
        return tree.unflatten(self._vjp(self.h, tree.leaves(w)), self.h_spec)


def _check_map_output(out: Any, x: Tree) -> None:
    try:
        _checks.like(out, "fixed_point_map(x, hparams)", x, "x")
    except (TypeError, ValueError) as e:
        raise type(e)(
            f"`fixed_point_map` must return a pytree like `x` (same structure, shapes, dtype): {e}"
        ) from None


def _diagnose(lin: _Linearized, res: SolveResult, fixed_point_tol: float | None) -> dict:
    info: dict[str, Any] = {
        "solve": res,
        "fixed_point_residual": lin.residual,
        "contraction": lin.max_ratio if lin.matvecs else None,
    }
    reasons = []
    if lin.captured:
        reasons.append(_captured_reason("fixed_point_map", lin.captured, "`x` nor `hparams`"))
    if not bool(res.converged):
        reasons.append("the linear solve did not converge (increase the solver's iterations; "
                       "a singular I - dT/dx also stops it)")
    if fixed_point_tol is not None and not bool(lin.residual <= fixed_point_tol):
        reasons.append("`x` is not a fixed point of `fixed_point_map` (iterate it further)")
    if lin.matvecs and not bool(lin.max_ratio < 1):
        reasons.append("`fixed_point_map` is not contractive along the solve "
                       "(||dT/dx^T v|| >= ||v|| for a solver vector v; see info['contraction'])")
    info["reasons"] = reasons
    info["trusted"] = not reasons
    return info


def _check_entry(
    name: str, fixed_point_map, x: Tree, hparams: Tree, solver, on_failure: str,
    fixed_point_tol: float | None,
) -> None:
    _reject_functorch(name, x, hparams)
    _checks.callable_(fixed_point_map, "fixed_point_map")
    _checks.callable_(solver, "solver")
    _check_policy(on_failure)
    if fixed_point_tol is not None:
        _checks.nonneg_number(fixed_point_tol, "fixed_point_tol")
    x_flat = _checks.tensor_tree(x, "x")
    h_flat = _checks.tensor_tree(hparams, "hparams")
    _checks.same_dtype(h_flat, "hparams", [x_flat[0]] * len(h_flat), "x")
    _checks.finite(x, "x")
    _checks.finite(hparams, "hparams")


def fixed_point_grad(
    fixed_point_map: FixedPointMap,
    outer_loss: Loss,
    x: Tree,
    hparams: Tree,
    *,
    solver: Callable[..., SolveResult] | None = None,
    return_info: bool = False,
    on_failure: str = "warn",
    fixed_point_tol: float | None = 1e-3,
) -> Tree | tuple[Tree, dict[str, Any]]:
    """``dL(x*(h), h)/dh = dL/dh + (dT/dh)^T (I - dT/dx)^{-T} dL/dx`` at a fixed point ``x``.

    Args:
        fixed_point_map: ``T(x, hparams) -> pytree like x``; ``x`` must (approximately) satisfy
            ``T(x, hparams) == x``.
        outer_loss: ``L(x, hparams) -> scalar``; may depend on ``hparams`` directly.
        x: the fixed point (pytree). hparams: pytree of floating tensors of ``x``'s dtype.
            Neither needs ``requires_grad``; nothing is written to ``.grad``.
        solver: ``solver(matvec, b) -> SolveResult`` for the non-symmetric system
            ``(I - dT/dx)^T w = dL/dx``; default ``hg.gmres`` with its defaults.
            ``partial(hg.neumann, ...)`` is the classical series ``sum_k (dT/dx^T)^k dL/dx``.
        return_info: also return a dict: ``"solve"`` (the ``SolveResult``),
            ``"fixed_point_residual"``, ``"contraction"`` (max ``||dT/dx^T v|| / ||v||`` over
            the solver's vectors), ``"reasons"`` and ``"trusted"``.
        on_failure: ``"warn"`` (once per reason), ``"raise"`` (:class:`HypergradientError`) or
            ``"ignore"`` when the solve did not converge, ``x`` is not a fixed point
            (residual > ``fixed_point_tol``), ``T`` is not contractive along the solve, or
            ``T`` uses a tensor that requires grad but is in neither ``x`` nor ``hparams``
            (a captured weight: its gradient would be silently missing).
        fixed_point_tol: threshold on ``"fixed_point_residual"``; ``None`` skips the check.

    Cost: one forward of ``T`` with its graph, one backward per solver matvec, one more for the
    ``hparams`` product, one gradient of ``L``.
    """
    solver = gmres if solver is None else solver
    _check_entry("fixed_point_grad", fixed_point_map, x, hparams, solver, on_failure,
                 fixed_point_tol)
    _checks.callable_(outer_loss, "outer_loss")
    dL_dx, dL_dh = _outer_grads(outer_loss, x, hparams)
    _checks.finite(dL_dx, "dL/dx (the gradient of outer_loss)")
    lin = _Linearized(fixed_point_map, x, hparams)
    res = _call_solver(solver, lin, dL_dx)
    hypergrad = tree.add(dL_dh, lin.mixed(res.solution))
    info = _diagnose(lin, res, fixed_point_tol)
    _report(info["reasons"], on_failure)
    return (hypergrad, info) if return_info else hypergrad


def _outer_grads(outer_loss: Loss, x: Tree, hparams: Tree) -> tuple[Tree, Tree]:
    x_flat, x_spec = tree.flatten(x)
    h_flat, h_spec = tree.flatten(hparams)
    xs = [t.detach().requires_grad_(True) for t in x_flat]
    hs = [t.detach().requires_grad_(True) for t in h_flat]
    with torch.enable_grad():
        L = _checks.scalar_loss(
            outer_loss(tree.unflatten(xs, x_spec), tree.unflatten(hs, h_spec)), "outer_loss"
        )
        grads = torch.autograd.grad(L, xs + hs, allow_unused=True) if L.requires_grad else None
    if grads is None:
        grads = [None] * (len(xs) + len(hs))
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(xs + hs, grads)]
    return tree.unflatten(grads[: len(xs)], x_spec), tree.unflatten(grads[len(xs) :], h_spec)


class _FixedPoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: dict[str, Any], *tensors: torch.Tensor):  # type: ignore[override]
        ctx.cfg = cfg
        ctx.save_for_backward(*tensors)
        return tuple(t.detach().clone() for t in tensors[: cfg["n_x"]])

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):  # type: ignore[override]
        cfg = ctx.cfg
        tensors = ctx.saved_tensors
        n = cfg["n_x"]
        x_flat, h_flat = list(tensors[:n]), list(tensors[n:])
        v = [torch.zeros_like(t) if g is None else g for t, g in zip(x_flat, grad_outputs)]
        x = tree.unflatten(x_flat, cfg["x_spec"])
        v_tree = tree.unflatten(v, cfg["x_spec"])
        _checks.finite(v_tree, "the gradient arriving at fixed_point_solution's output")
        lin = _Linearized(cfg["fixed_point_map"], x, tree.unflatten(h_flat, cfg["h_spec"]))
        res = _call_solver(cfg["solver"], lin, v_tree)
        mixed = tree.leaves(lin.mixed(res.solution))
        info = _diagnose(lin, res, cfg["fixed_point_tol"])
        if cfg["info"] is not None:
            cfg["info"].clear()
            cfg["info"].update(info)
        _report(info["reasons"], cfg["on_failure"])
        return (None, *([None] * n), *mixed)


def fixed_point_solution(
    fixed_point_map: FixedPointMap,
    x: Tree,
    hparams: Tree,
    *,
    solver: Callable[..., SolveResult] | None = None,
    on_failure: str = "warn",
    fixed_point_tol: float | None = 1e-3,
    info: dict[str, Any] | None = None,
) -> Tree:
    """``x``'s values as a differentiable function of ``hparams`` (an IFT autograd node).

    The forward returns copies of ``x`` (the fixed point you found any way you like: plain
    iteration, Anderson, Broyden); the backward maps an incoming ``v = dL/dx`` to
    ``(dT/dh)^T (I - dT/dx)^{-T} v`` into ``hparams``, so ``loss.backward()`` fills
    ``hparams``' ``.grad``. No gradient flows into ``x`` itself. Pass a dict as ``info`` to
    receive the backward's diagnostics (see :func:`fixed_point_grad`).

    Example:
        >>> import torch, hypergrad as hg
        >>> h = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
        >>> x = hg.fixed_point_solution(lambda x, h: 0.5 * x + h, 2 * h.detach(), h)
        >>> (x ** 2).sum().backward(); h.grad.tolist()
        [12.0]
    """
    solver = gmres if solver is None else solver
    _check_entry("fixed_point_solution", fixed_point_map, x, hparams, solver, on_failure,
                 fixed_point_tol)
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"`info` must be a dict to receive diagnostics, got {type(info).__name__}")
    x_flat, x_spec = tree.flatten(x)
    h_flat, h_spec = tree.flatten(hparams)
    if not any(t.requires_grad for t in h_flat):
        raise ValueError(
            "`hparams` must require grad for fixed_point_solution to carry a hypergradient; "
            "call .requires_grad_() on them (or use hg.fixed_point_grad, which needs none)"
        )
    cfg = {
        "fixed_point_map": fixed_point_map,
        "solver": solver,
        "n_x": len(x_flat),
        "x_spec": x_spec,
        "h_spec": h_spec,
        "on_failure": on_failure,
        "fixed_point_tol": fixed_point_tol,
        "info": info,
    }
    out = _FixedPoint.apply(cfg, *[t.detach() for t in x_flat], *h_flat)
    return tree.unflatten(list(out), x_spec)
