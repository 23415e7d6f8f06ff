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

from collections.abc import Callable
from typing import Any

import torch

from . import _checks, tree
from .implicit import _check_node_entry, _outer_grads, _relative, _solution_node
from .solvers import SolveResult, gmres
from .transformable import in_functorch_transform
from .tree import Tree

__all__ = ["fixed_point_grad", "fixed_point_solution"]

FixedPointMap = Callable[[Tree, Tree], Tree]
Loss = Callable[[Tree, Tree], torch.Tensor]


# --- shared with forward.py ---------------------------------------------------------------------
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


def _captured_reason(name: str, found: list[torch.Tensor], args: str) -> str:
    shapes = ", ".join(str(tuple(t.shape)) for t in found[:5]) + (" ..." if len(found) > 5 else "")
    return (f"`{name}` uses {len(found)} tensor(s) that require grad but are in neither {args} "
            f"(shapes {shapes}); their gradients are not part of the result: pass them in "
            "`hparams` or detach them")


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
        self.captured = _checks.captured_leaves(self.out, self.x + self.h)
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
    health = _checks.Health()  # the premise checks, read from the device in one transfer
    health.add("converged", res.converged)
    if fixed_point_tol is not None:
        health.add("fixed_point", lin.residual <= fixed_point_tol)
    if lin.matvecs:
        health.add("contractive", lin.max_ratio < 1)
    health.read()
    reasons = []
    if lin.captured:
        reasons.append(_captured_reason("fixed_point_map", lin.captured, "`x` nor `hparams`"))
    if not health.get("converged"):
        reasons.append("the linear solve did not converge (increase the solver's iterations; "
                       "a singular I - dT/dx also stops it)")
    if fixed_point_tol is not None and not health["fixed_point"]:
        reasons.append("`x` is not a fixed point of `fixed_point_map` (iterate it further)")
    if lin.matvecs and not health["contractive"]:
        reasons.append("`fixed_point_map` is not contractive along the solve "
                       "(||dT/dx^T v|| >= ||v|| for a solver vector v; see info['contraction'])")
    info["reasons"] = reasons
    info["trusted"] = not reasons
    return info


def _check_entry(
    name: str, fn: Any, x: Tree, hparams: Tree, solver: Any, on_failure: str,
    tol: float | None, names: tuple[str, str, str] = ("fixed_point_map", "x", "fixed_point_tol"),
) -> None:
    """The entry checks of ``name`` (shared with forward.py's inner-loss functions):
    ``names`` are the argument names of ``fn``, ``x`` and ``tol`` in its signature."""
    fn_name, x_name, tol_name = names
    _reject_functorch(name, x, hparams)
    _checks.callable_(fn, fn_name)
    _checks.callable_(solver, "solver")
    _checks.policy(on_failure)
    if tol is not None:
        _checks.nonneg_number(tol, tol_name)
    x_flat = _checks.tensor_tree(x, x_name)
    h_flat = _checks.tensor_tree(hparams, "hparams")
    _checks.same_dtype(h_flat, "hparams", [x_flat[0]] * len(h_flat), x_name)
    _checks.finite_trees((x, x_name), (hparams, "hparams"))


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
    ``hparams`` product, one gradient of ``L``; three host reads (NaN/inf in ``x`` and
    ``hparams``, in ``dL/dx``, and the diagnosis) plus whatever the solver reads.
    """
    solver = gmres if solver is None else solver
    _check_entry("fixed_point_grad", fixed_point_map, x, hparams, solver, on_failure,
                 fixed_point_tol)
    _checks.callable_(outer_loss, "outer_loss")
    _, dL_dx_flat, dL_dh_flat, x_spec, h_spec = _outer_grads(outer_loss, x, hparams)
    dL_dx, dL_dh = tree.unflatten(dL_dx_flat, x_spec), tree.unflatten(dL_dh_flat, h_spec)
    _checks.finite(dL_dx, "dL/dx (the gradient of outer_loss)")
    lin = _Linearized(fixed_point_map, x, hparams)
    res = _call_solver(solver, lin, dL_dx)
    hypergrad = tree.add(dL_dh, lin.mixed(res.solution))
    info = _diagnose(lin, res, fixed_point_tol)
    _checks.report_failure(info["reasons"], on_failure, stacklevel=3)
    return (hypergrad, info) if return_info else hypergrad


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
    _check_node_entry("fixed_point_solution", "fixed_point_grad", info, tree.leaves(hparams))
    x_spec, h_spec = tree.flatten(x)[1], tree.flatten(hparams)[1]

    def vjp(x_flat: list[torch.Tensor], h_flat: list[torch.Tensor],
            v: list[torch.Tensor]) -> list[torch.Tensor]:
        v_tree = tree.unflatten(v, x_spec)
        _checks.finite(v_tree, "the gradient arriving at fixed_point_solution's output")
        lin = _Linearized(fixed_point_map, tree.unflatten(x_flat, x_spec),
                          tree.unflatten(h_flat, h_spec))
        res = _call_solver(solver, lin, v_tree)
        mixed = tree.leaves(lin.mixed(res.solution))
        diagnosis = _diagnose(lin, res, fixed_point_tol)
        if info is not None:
            info.clear()
            info.update(diagnosis)
        _checks.report_failure(diagnosis["reasons"], on_failure, stacklevel=4)
        return mixed

    return _solution_node(vjp, x, hparams)
