"""Implicit differentiation (IFT) of an inner optimum with respect to hyperparameters.

The invariant: ``params`` is a stationary point of the inner loss, ``d f(params, hparams) /
d params == 0``, with a positive-definite Hessian ``H = d2 f / d params2``. Then the implicit
function theorem gives the best-response Jacobian
    d params* / d hparams = - H^{-1} d2 f / (d params d hparams)            (IFT)
and the hypergradient of an outer loss L(params*, hparams)
    dL/dhparams = dL/dhparams|direct - (d2 f / d hparams d params) H^{-1} dL/dparams.
(Lorraine et al. 2020, Eq. 2-5; Raghu et al. 2021, Eq. 3.) The inverse-Hessian product is a
linear solve handed to ``solver``; the premise is checked and reported, never assumed.

Health check, once per solve: every signal of one call (NaN/inf in the inputs, the inner loss
value, its gradient, the outer gradient, the solution and the hypergradient; the solver's
residual, iterations and curvature statistics; the stationarity of ``params``) is gathered on
the device and read in one host transfer, then turned into errors (non-finite inputs and
losses: ``ValueError`` naming where), warnings or ``HypergradientError`` (a failed premise or
solve, by ``on_failure``), and ``info``. With a solver that reads nothing itself (a fixed-step
Neumann series) that is one device synchronisation per hypergradient.

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

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from . import _checks, tree
from ._checks import DoubleBackwardError, HypergradientError, HypergradientWarning
from .finite_difference import FiniteDifferenceOperator
from .products import HessianOperator, _no_path_error, _raise_nonfinite
from .solvers import SolveResult, cg
from .transformable import in_functorch_transform
from .tree import Tree

__all__ = [
    "implicit_grad",
    "implicit_solution",
    "HypergradientWarning",
    "HypergradientError",
    "DoubleBackwardError",
]

Loss = Callable[[Tree, Tree], torch.Tensor]
# solver statistics read with the health check (the keys SolveResult.stats documents)
_STATS = ("nonpositive_curvature", "min_rayleigh", "max_rayleigh", "stagnated", "alpha",
          "residual_estimate", "terms")
# the damping suggested for a singular / too ill-conditioned Hessian, relative to the largest
# curvature the solver saw: the damped system then has condition number <= 1e3
_DAMPING_FRACTION = 1e-3


def _reject_functorch(params: Tree, hparams: Tree) -> None:
    if in_functorch_transform(params) or in_functorch_transform(hparams):
        raise TypeError(
            "implicit_grad / implicit_solution use torch.autograd and cannot run inside "
            "torch.func transforms (vmap, grad, jacrev); use hg.functional_implicit_grad, "
            "which is written in torch.func and composes with them"
        )


class _FiniteDifference:
    """The finite-difference products of the IFT (``hypergrad.FiniteDifferenceOperator``,
    built without re-validation) with the health hooks ``HessianOperator`` has, from the
    gradients the products take anyway: no extra gradient and no extra host read.

    - ``public``: the first gradient evaluation (a matvec, or the mixed product when the
      solver spends none) also records the graph with respect to ``params`` and walks it:
      an ``inner_loss`` with no autograd path to ``params`` raises, and tensors it captures
      are reported (:meth:`captured`), without a separate forward.
    - The inner gradient behind the health check (finite?) and ``info["inner_grad_norm"]`` is
      the mean of the two gradients of the first product along ``params``, ``g(θ) + O(δ²)``
      (of the stationarity product when that runs); absent when no product along ``params``
      was taken (a solver that spends none, such as ``hg.sama``, with
      ``stationarity_tol=None``). The loss value checked for NaN/inf is that of the first
      evaluation, at ``params ± δ v``."""

    def __init__(self, inner_loss: Loss, params: Tree, hparams: Tree, public: bool,
                 eps: float | None) -> None:
        self._fd = FiniteDifferenceOperator._internal(
            inner_loss, params, hparams, (), name="inner_loss", eps=eps, inspect=public,
            summarize=True)
        self._p, self._h = tree.leaves(params), tree.leaves(hparams)
        self._public = public

    def _check_path(self) -> None:
        if self._public and self._fd._params_reached is False:
            raise _no_path_error("inner_loss")

    def __call__(self, v: Tree) -> Tree:
        out = self._fd(v)
        self._check_path()
        return out

    def mixed_vjp(self, v: Tree) -> Tree:
        out = self._fd.mixed_vjp(v)
        self._check_path()
        return out

    def gradient_and_product(self, v: Tree) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Leaves of ``(g(θ) + O(δ²), H v)`` from one product: two gradients, not three."""
        hv, g = self._fd._product_and_gradient(v)
        self._check_path()
        return g, tree.leaves(hv)

    def inner_grad_norm(self) -> torch.Tensor | None:
        return self._fd._grad_norm

    def _add_health(self, health: _checks.Health) -> None:
        health.add_finite("params", self._p)
        health.add_finite("hparams", self._h)
        if self._fd._first_value is not None:
            health.add_finite("loss", [self._fd._first_value])
        health.add("loss_grad", self._fd._grad_finite)  # one flag per leaf (or nothing)

    def _raise_nonfinite(self, health: _checks.Health) -> None:
        _raise_nonfinite(health, "inner_loss", self._p, self._h)

    def captured(self) -> list[torch.Tensor]:
        return self._fd._captured


def _operator(inner_loss: Loss, params: Tree, hparams: Tree, products: str, public: bool,
              fd_eps: float | None = None):
    """The inner Hessian's products: exact (double backward) or finite differences."""
    if products == "finite_difference":
        return _FiniteDifference(inner_loss, params, hparams, public, fd_eps)
    return HessianOperator._internal(inner_loss, params, hparams, name="inner_loss")


def _inner_grad_norm(op: Any) -> torch.Tensor | None:
    """The inner gradient's norm as far as the operator knows it without an extra gradient
    (exact: its own gradient; finite differences: see :class:`_FiniteDifference`)."""
    if isinstance(op, _FiniteDifference):
        return op.inner_grad_norm()
    norm = getattr(op, "_inner_grad_norm", None)  # asked twice per solve: computed once
    if norm is None:
        norm = op._inner_grad_norm = tree.norm(op.grad)
    return norm


def _check_entry(inner_loss: Any, params: Tree, hparams: Tree, solver: Any, on_failure: Any,
                 stationarity_tol: Any, products: Any, fd_eps: Any = None) -> None:
    """The settings checks of implicit_grad and implicit_solution (Python only)."""
    _reject_functorch(params, hparams)
    _checks.callable_(inner_loss, "inner_loss")
    _checks.callable_(solver, "solver")
    _checks.policy(on_failure)
    if stationarity_tol is not None:
        _checks.nonneg_number(stationarity_tol, "stationarity_tol")
    _checks.products(products, fd_eps)


def _check_trees(params: Tree, hparams: Tree) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Structure, dtype and device of ``params`` and ``hparams`` (Python only, no host read)."""
    p_flat = _checks.tensor_tree(params, "params")
    h_flat = _checks.tensor_tree(hparams, "hparams")
    _checks.one_device(p_flat, "params")
    _checks.same_dtype(h_flat, "hparams", [p_flat[0]] * len(h_flat), "params")
    return p_flat, h_flat


def _solve(op: Callable[[Tree], Tree], rhs: Tree, solver: Callable[..., SolveResult],
           explain: Callable[[], None] | None = None) -> SolveResult:
    """``solver(op, rhs)``, type-checked. If the solver raises, ``explain`` reads the health of
    the inputs (the failure path only) and raises a named error for a NaN/inf it finds, so a
    solver's complaint about its ``b`` is reported as what it is (say, the outer gradient)."""
    try:
        res = solver(op, rhs)
    except Exception as e:
        if explain is not None:
            try:
                explain()
            except ValueError as named:
                raise named from e
        raise
    if not isinstance(res, SolveResult):
        raise TypeError(
            f"`solver` must return a hypergrad.SolveResult, got {type(res).__name__}; "
            "wrap your solver or use hg.cg / hg.neumann"
        )
    return res


def _explainer(op: Any, add: Callable[[_checks.Health], None],
               check: Callable[[_checks.Health], None]) -> Callable[[], None]:
    def explain() -> None:
        health = _checks.Health()
        op._add_health(health)
        add(health)
        health.read()
        op._raise_nonfinite(health)
        check(health)

    return explain


def _relative(num: torch.Tensor, *scales: torch.Tensor) -> torch.Tensor:
    """``num / max(scales)``, the denominator clamped to the dtype's smallest normal number."""
    denom = scales[0]
    for s in scales[1:]:
        denom = torch.maximum(denom, s)
    return num / torch.clamp(denom, min=torch.finfo(denom.dtype).tiny)


def _stationarity_ratio(g: Tree, hp: Tree) -> torch.Tensor:
    """``||g|| / max(||H p||, ||H p - g||)`` from the gradient ``g`` and ``hp = H p``: for a
    quadratic ``f = 0.5 p^T H p - b^T p`` the relative residual ``||H p - b|| / max(||H p||,
    ||b||)`` of the optimality condition; scale-free in ``f`` and in ``params``. No host read
    (also used by forward.py)."""
    return _relative(tree.norm(g), tree.norm(hp), tree.norm(tree.sub(hp, g)))


def _stationarity(op: Any, params: Tree) -> torch.Tensor:
    """:func:`_stationarity_ratio` at ``params``: one extra matvec (with finite differences the
    same two gradients give the inner gradient too)."""
    if isinstance(op, _FiniteDifference):
        g, hp = op.gradient_and_product(tree.detach(params))
        return _stationarity_ratio(g, hp)
    return _stationarity_ratio(op.grad, op(tree.detach(params)))


def _add_solve_health(health: _checks.Health, op: Any, res: SolveResult,
                      hypergrad: list[torch.Tensor], stationarity: torch.Tensor | None) -> None:
    op._add_health(health)
    health.add_finite("solution", tree.leaves(res.solution))
    health.add_finite("hypergrad", hypergrad)
    health.add("residual_norm", res.residual_norm)
    health.add("converged", res.converged)
    health.add("iterations", res.iterations)
    for key in _STATS:
        value = (res.stats or {}).get(key)
        if isinstance(value, (torch.Tensor, bool, int, float)):
            health.add("stat_" + key, value)
    health.add("inner_grad_norm", _inner_grad_norm(op))  # nothing when unknown
    health.add("stationarity", stationarity)


def _solver_name(solver: Callable[..., SolveResult]) -> str:
    fn = getattr(solver, "func", solver)  # functools.partial
    name = getattr(fn, "__name__", "")
    return f"hg.{name}" if name in ("cg", "neumann", "minres", "gmres", "normal_cg",
                                     "nystrom", "sama") else "your solver"


def _damping_advice(solver: Callable[..., SolveResult], lo: float | None,
                    hi: float | None) -> str:
    name = _solver_name(solver)
    if hi is None or not (math.isfinite(hi) and hi > 0):
        return (f"Add damping, e.g. solver=functools.partial({name}, damping=...) with damping "
                "about 1e-3 x the largest eigenvalue of the inner Hessian")
    d = _DAMPING_FRACTION * hi
    text = (f"Add damping, e.g. solver=functools.partial({name}, damping={d:.0e}): 1e-3 x the "
            f"largest curvature the solver saw ({hi:.1e}), so the damped system has condition "
            "number <= ~1e3 and converges in about a hundred products")
    if lo is not None and math.isfinite(lo) and 0 < lo < d:
        text += (f"; a smaller damping, down to the smallest curvature it resolved ({lo:.1e}), "
                 "biases the hypergradient less and needs more iterations")
    return text + " (damping solves (H + damping I) w = b: a biased but well-posed IFT)"


def _start_only(h: _checks.Health) -> bool:
    """Whether the solver's residual is an estimate that describes its starting point, not the
    returned solution: ``stats["residual_estimate"]`` with a one-term series (``stats["terms"]
    == 1``: hg.sama, hg.neumann(iterations=1)), or, for a solver that does not report
    ``terms``, no matvec spent at all. Such a solve is an approximation by design."""
    if not h.get("stat_residual_estimate", 0.0):
        return False
    terms = h.get("stat_terms")
    return terms == 1 if terms is not None else h["iterations"] == 0


def _by_design_reason(h: _checks.Health, solver: Callable[..., SolveResult]) -> str:
    name = _solver_name(solver)
    measure = ("residual=True" if name == "hg.sama" else
               "exact_residual=True" if name == "hg.neumann" else "an exact residual")
    return (
        f"the solver's residual ({h['residual_norm']:.1e}) is an estimate, that of its starting "
        f"point, not of the returned solution: {name} with one term spends no product on the "
        "solve, an approximation of H^-1 b by design (x = alpha D b), so its accuracy is not "
        f"measured; pass {measure} to measure it (one matvec), or on_failure='ignore' to accept "
        "the approximation"
    )


def _solve_reasons(h: _checks.Health, solver: Callable[..., SolveResult],
                   eps: float) -> tuple[list[str], dict[str, bool]]:
    """Why the solve cannot be trusted, each with the fix that addresses it."""
    residual, iters = h["residual_norm"], int(h["iterations"])
    converged = bool(h["converged"]) and math.isfinite(residual)
    by_design = _start_only(h)
    lo, hi = h.get("stat_min_rayleigh"), h.get("stat_max_rayleigh")
    nonpos = bool(h.get("stat_nonpositive_curvature", 0.0))
    known = lo is not None and hi is not None and math.isfinite(hi) and hi > 0
    # zero curvature up to rounding (a singular PSD Hessian) is not a saddle
    flat = known and math.isfinite(lo) and abs(lo) <= hi * math.sqrt(eps)
    negative = nonpos and not flat
    # no progress at all: the run ended no better than the zero guess (or worse)
    no_progress = not converged and not residual < 1.0 and not by_design
    stagnated = bool(h.get("stat_stagnated", no_progress)) and not converged and not by_design
    reasons = []
    broken = h.first_nonfinite("solution") is not None
    if broken:
        cause = ("the Hessian is singular or not positive definite" if (flat or nonpos) else
                 "the products of the inner Hessian overflow or the solver diverged")
        reasons.append(f"the linear solve returned NaN/inf after {iters} products ({cause})")
    elif h.first_nonfinite("hypergrad") is not None:
        reasons.append(
            "the hypergradient is NaN/inf although the solve is finite: the mixed second "
            "derivative d2 inner_loss / (d params d hparams) overflows"
        )
    if negative:
        reasons.append(
            "the inner Hessian has non-positive curvature (the solver met a direction with "
            f"v^T H v / v^T v = {lo:.2e} <= 0): `params` is not at a strict minimum of "
            "inner_loss; optimise it further, use hg.minres for a saddle, or add damping "
            f"> {abs(lo):.1e} to make H + damping I positive definite"
        )
    if not converged and not negative and not broken and by_design:
        reasons.append(_by_design_reason(h, solver))
    elif not converged and not negative and not broken:
        where = f"relative residual {residual:.1e} after {iters} products"
        alpha = h.get("stat_alpha")
        if alpha is not None and not residual <= 1.0 and not flat:
            reasons.append(
                f"the linear solve did not converge ({where}): the Neumann series diverges "
                f"with alpha={alpha:.2e}; use alpha='auto' or an alpha below 2 / lambda_max "
                "of the inner Hessian"
            )
        elif flat or no_progress:
            reasons.append(
                f"the linear solve did not converge ({where}) and more iterations will not "
                "help: the inner Hessian is singular or too ill-conditioned. "
                + _damping_advice(solver, lo if known else None, hi if known else None)
            )
        elif stagnated:  # the solver says the residual stopped falling fast enough
            advice = _damping_advice(solver, lo if known else None, hi if known else None)
            reasons.append(
                f"the linear solve did not converge ({where}) and it is progressing slowly "
                "(the solver reports stagnation): the inner Hessian is ill-conditioned. "
                "Increase the solver's iterations if the budget allows (it may need many "
                f"more), or: {advice[0].lower()}{advice[1:]}"
            )
        else:
            reasons.append(
                f"the linear solve did not converge ({where}); increase the solver's "
                "iterations (maxiter= for hg.cg / hg.minres / hg.gmres, iterations= for "
                "hg.neumann)"
            )
    return reasons, {"singular": bool(flat and not converged), "stagnated": stagnated}


def _diagnose(h: _checks.Health, op: Any, res: SolveResult,
              stationarity: torch.Tensor | None, stationarity_tol: float | None,
              solver: Callable[..., SolveResult]) -> dict[str, Any]:
    """``info`` from the one read: premise checks and the solve, with advice."""
    eps = torch.finfo(op._p[0].dtype).eps
    reasons, flags = _solve_reasons(h, solver, eps)
    info: dict[str, Any] = {"solve": res, "inner_grad_norm": _inner_grad_norm(op)}
    info["nonpositive_curvature"] = bool(h.get("stat_nonpositive_curvature", 0.0))
    info.update(flags)
    if stationarity is not None:
        info["stationarity"] = stationarity
        s = h["stationarity"]
        if not s <= stationarity_tol:
            reasons.append(
                "`params` is not a stationary point of the inner loss (relative gradient "
                f"{s:.1e} > stationarity_tol={stationarity_tol:g}); optimise it further"
            )
    info["health"] = {k: h[k] for k in ("residual_norm", "iterations", "converged",
                                        "inner_grad_norm", "stationarity") if k in h}
    info["health"].update({k[5:]: h[k] for k in ("stat_" + s for s in _STATS) if k in h})
    info["reasons"] = reasons
    info["trusted"] = not reasons
    return info


def _warn_captured(op: Any, stacklevel: int) -> None:
    captured = op.captured()
    if captured:
        shapes = ", ".join(str(tuple(x.shape)) for x in captured[:5])
        more = f" and {len(captured) - 5} more" if len(captured) > 5 else ""
        warnings.warn(
            f"`inner_loss` uses {len(captured)} tensor(s) that require grad but are in neither "
            f"`params` nor `hparams` (shapes {shapes}{more}), e.g. a module's own nn.Parameter "
            "read through a closure: the Hessian treats them as constants and no hypergradient "
            "reaches them. Pass them in `params` (inner variables) or `hparams`, or detach them",
            HypergradientWarning, stacklevel=stacklevel,
        )


def _outer_grads(outer_loss: Loss, params: Tree, hparams: Tree
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], Any, Any]:
    """``(L, dL/dparams leaves, dL/dhparams leaves, params spec, hparams spec)`` at
    ``(params, hparams)``; zeros for leaves ``L`` does not use (also used by fixed_point)."""
    p_flat, p_spec = tree.flatten(params)
    h_flat, h_spec = tree.flatten(hparams)
    p = [x.detach().requires_grad_(True) for x in p_flat]
    h = [x.detach().requires_grad_(True) for x in h_flat]
    grads: Sequence[torch.Tensor | None]  # None: a leaf the loss does not use
    with torch.enable_grad():
        L = _checks.scalar_loss(
            outer_loss(tree.unflatten(p, p_spec), tree.unflatten(h, h_spec)), "outer_loss"
        )
        if L.requires_grad:
            grads = torch.autograd.grad(L, p + h, allow_unused=True)
        else:
            grads = [None] * (len(p) + len(h))
    full = [torch.zeros_like(x) if g is None else g for x, g in zip(p + h, grads)]
    return L.detach(), full[: len(p)], full[len(p):], p_spec, h_spec


class PendingHealth(NamedTuple):
    """The health check of an IFT solve, gathered but not yet read (internal callers that fold
    it into their own one host read): add signals to ``health``, call ``health.read()``, then
    ``complete()``, which raises or warns as the solve's own read would have and fills the
    caller's ``info``. ``solve`` is the solver's result (its tensors, for the caller's use)."""

    health: _checks.Health
    solve: SolveResult
    complete: Callable[[], None]


def _ift_prepare(op: Any, params: Tree, rhs: Tree, solver: Callable[..., SolveResult],
                 stationarity_tol: float | None, add: Callable[[_checks.Health], None],
                 check: Callable[[_checks.Health], None],
                 combine: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                 ) -> tuple[list[torch.Tensor], _checks.Health, SolveResult,
                            Callable[[], dict[str, Any]]]:
    """:func:`_ift` up to its host read: the hypergradient leaves, the unread health, the
    solve, and ``finish()`` (after ``health.read()``: raise on what the read found, return
    ``info``)."""
    res = _solve(op, rhs, solver, _explainer(op, add, check))
    hyper = combine(tree.leaves(op.mixed_vjp(res.solution)))
    stationarity = None if stationarity_tol is None else _stationarity(op, params)
    health = _checks.Health()
    _add_solve_health(health, op, res, hyper, stationarity)
    add(health)

    def finish() -> dict[str, Any]:
        op._raise_nonfinite(health)
        check(health)
        return _diagnose(health, op, res, stationarity, stationarity_tol, solver)

    return hyper, health, res, finish


def _ift(op: Any, params: Tree, rhs: Tree, solver: Callable[..., SolveResult],
         stationarity_tol: float | None, add: Callable[[_checks.Health], None],
         check: Callable[[_checks.Health], None],
         combine: Callable[[list[torch.Tensor]], list[torch.Tensor]],
         ) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The IFT core of implicit_grad and implicit_solution's backward: ``w = H^{-1} rhs``,
    the hypergradient leaves ``combine(w^T d2f/(dparams dhparams))``, the stationarity check,
    then the one host read (the operator's, the solve's and the caller's signals: ``add``
    records, ``check`` raises) and ``info``."""
    hyper, health, _, finish = _ift_prepare(op, params, rhs, solver, stationarity_tol, add,
                                            check, combine)
    health.read()  # the one host read of this call
    return hyper, finish()


def _implicit_grad(inner_loss: Loss, outer_loss: Loss, params: Tree, hparams: Tree, *,
                   solver: Callable[..., SolveResult], on_failure: str,
                   stationarity_tol: float | None, products: str, public: bool,
                   stacklevel: int, fd_eps: float | None = None) -> tuple[Tree, dict[str, Any]]:
    op = _operator(inner_loss, params, hparams, products, public, fd_eps)
    L, dL_dp, dL_dh, p_spec, h_spec = _outer_grads(outer_loss, params, hparams)

    def add(health: _checks.Health) -> None:
        health.add_finite("outer_loss", [L])
        health.add_finite("dL_dp", dL_dp)
        health.add_finite("dL_dh", dL_dh)

    def check(health: _checks.Health) -> None:
        if health.first_nonfinite("outer_loss") is not None:
            raise ValueError("the value of `outer_loss` at `params` is NaN/inf; fix the outer "
                             "loss")
        for key, flat, what in (("dL_dp", dL_dp, "params"), ("dL_dh", dL_dh, "hparams")):
            i = health.first_nonfinite(key)
            if i is not None:
                raise ValueError(
                    f"the gradient of `outer_loss` with respect to `{what}` leaf {i} (shape "
                    f"{tuple(flat[i].shape)}) is NaN/inf (e.g. sqrt or log at 0)"
                )

    hyper, info = _ift(op, params, tree.unflatten(dL_dp, p_spec), solver, stationarity_tol,
                       add, check, lambda mixed: [a - b for a, b in zip(dL_dh, mixed)])
    if public:  # after the products: finite differences find captured tensors in their first
        _warn_captured(op, stacklevel)
    _checks.report_failure(info["reasons"], on_failure, stacklevel)
    return tree.unflatten(hyper, h_spec), info


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
    products: str = "exact",
    fd_eps: float | None = None,
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
            ``"nonpositive_curvature"``, ``"singular"``, ``"stagnated"``, ``"health"`` (every
            signal of the health check as Python numbers), ``"reasons"`` and ``"trusted"``.
        on_failure: ``"warn"`` (once per reason), ``"raise"`` or ``"ignore"`` when the solve did
            not converge, returned NaN/inf, met non-positive curvature, or ``params`` is not
            stationary. Each reason says what to change (more iterations, ``damping=`` with a
            size measured from the solver's curvature, a smaller Neumann ``alpha``, ...).
        stationarity_tol: threshold on ``"stationarity"``; ``None`` skips the check (saves one
            Hessian-vector product).
        products: ``"exact"`` (reverse-over-reverse: needs a double backward) or
            ``"finite_difference"`` (central differences of first-order gradients,
            ``hypergrad.FiniteDifferenceOperator``: for models with no double backward,
            compiled losses; error O(sqrt(eps)) relative, see its docstring).
        fd_eps: the relative step ``eps`` of the finite-difference products (only with
            ``products="finite_difference"``); default ``hg.default_fd_step`` of the params'
            dtype, or of the autocast dtype inside ``torch.autocast``. A transformer under
            bf16 autocast wants ``fd_eps=hg.default_fd_step(torch.float32)``.

    Raises ``ValueError`` naming where NaN/inf appeared (``params``, ``hparams``, the inner
    loss value or gradient, the outer loss or its gradient) and when ``inner_loss`` has no
    autograd path to ``params``; :class:`DoubleBackwardError` when the inner loss
    has no double backward. Warns (:class:`HypergradientWarning`) when ``inner_loss`` reads a
    tensor that requires grad but is in neither ``params`` nor ``hparams``.

    Cost: one gradient graph of ``f``, the solver's matvecs, one mixed product, one gradient
    of ``L``, one matvec for the stationarity check, and one host read for the health check
    (plus whatever the solver reads to decide when to stop). With finite differences each
    product is two gradients of ``f`` and nothing else is spent on ``f``: the health check
    reads the gradients the products take (``info["inner_grad_norm"]`` is then the mean of
    the first product's two gradients, ``g(θ) + O(δ²)``, or None when no product along
    ``params`` was taken: a solver that spends none, such as ``hg.sama``, with
    ``stationarity_tol=None``).
    """
    _check_entry(inner_loss, params, hparams, solver, on_failure, stationarity_tol, products,
                 fd_eps)
    _checks.callable_(outer_loss, "outer_loss")
    _check_trees(params, hparams)
    g, info = _implicit_grad(inner_loss, outer_loss, params, hparams, solver=solver,
                             on_failure=on_failure, stationarity_tol=stationarity_tol,
                             products=products, public=True, stacklevel=4, fd_eps=fd_eps)
    return (g, info) if return_info else g


# The vector-Jacobian product of a solution node: (solution leaves, hparams leaves, incoming
# gradient leaves) -> gradient leaves for hparams.
SolutionVJP = Callable[[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]],
                       list[torch.Tensor]]


class _SolutionNode(torch.autograd.Function):
    """Forward: copies of the first ``n`` inputs (a solution found elsewhere, constant in
    autograd); backward: ``vjp`` of them into the remaining inputs (the hyperparameters). No
    gradient flows into the solution itself. Shared by implicit_solution and
    fixed_point_solution."""

    @staticmethod
    def forward(ctx, vjp: SolutionVJP, n: int, copy: bool,  # type: ignore[override]
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.vjp, ctx.n = vjp, n
        ctx.save_for_backward(*tensors)
        if copy:
            return tuple(t.detach().clone() for t in tensors[:n])
        # views of the solution (internal callers): an in-place change of an output raises,
        # and one of the solution itself fails the saved tensors' version check in backward
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):  # type: ignore[override]
        tensors, n = ctx.saved_tensors, ctx.n
        sol, h = list(tensors[:n]), list(tensors[n:])
        v = [torch.zeros_like(x) if g is None else g for x, g in zip(sol, grad_outputs)]
        return (None, None, None, *([None] * n), *ctx.vjp(sol, h, v))


def _check_node_entry(name: str, grad_name: str, info: Any, h_flat: list[torch.Tensor]) -> None:
    """``info`` is None or a dict, and some of ``hparams`` require grad (else the node would
    carry no hypergradient): the checks of implicit_solution and fixed_point_solution."""
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"`info` must be a dict to receive diagnostics, got {type(info).__name__}")
    if not any(x.requires_grad for x in h_flat):
        raise ValueError(
            f"`hparams` must require grad for {name} to carry a hypergradient; call "
            f".requires_grad_() on them (or use hg.{grad_name}, which needs none)"
        )


def _solution_node(vjp: SolutionVJP, solution: Tree, hparams: Tree, copy: bool = True) -> Tree:
    """``solution``'s values as a function of ``hparams`` whose backward is ``vjp``; copies of
    them, or (``copy=False``, internal callers that leave ``solution`` alone until the backward
    ran) views of them."""
    s_flat, s_spec = tree.flatten(solution)
    out = _SolutionNode.apply(vjp, len(s_flat), copy, *[x.detach() for x in s_flat],
                              *tree.leaves(hparams))
    return tree.unflatten(list(out), s_spec)


def _apply_implicit(inner_loss: Loss, params: Tree, hparams: Tree, *,
                    solver: Callable[..., SolveResult], on_failure: str,
                    stationarity_tol: float | None, info: dict[str, Any] | None,
                    products: str, public: bool, fd_eps: float | None,
                    pending: list[PendingHealth] | None = None) -> Tree:
    p_spec, h_spec = tree.flatten(params)[1], tree.flatten(hparams)[1]

    def vjp(p_flat: list[torch.Tensor], h_flat: list[torch.Tensor],
            v: list[torch.Tensor]) -> list[torch.Tensor]:
        p = tree.unflatten(p_flat, p_spec)
        op = _operator(inner_loss, p, tree.unflatten(h_flat, h_spec), products, public, fd_eps)

        def add(health: _checks.Health) -> None:
            health.add_finite("incoming", v)

        def check(health: _checks.Health) -> None:
            i = health.first_nonfinite("incoming")
            if i is not None:
                raise ValueError(
                    f"the gradient arriving at implicit_solution's output (leaf {i}, shape "
                    f"{tuple(v[i].shape)}) is NaN/inf: the loss downstream of implicit_solution "
                    "has a non-finite gradient (e.g. sqrt or log at 0)"
                )

        hyper, health, res, finish = _ift_prepare(
            op, p, tree.unflatten(v, p_spec), solver, stationarity_tol, add, check,
            lambda mixed: [-m for m in mixed])

        def complete(stacklevel: int = 4) -> None:
            diagnosis = finish()
            if public:
                _warn_captured(op, stacklevel=stacklevel)
            if info is not None:
                info.clear()
                info.update(diagnosis)
            _checks.report_failure(diagnosis["reasons"], on_failure, stacklevel=stacklevel)

        if pending is not None:  # the caller reads the health with its own signals
            pending.append(PendingHealth(health, res, complete))
        else:
            health.read()  # the one host read of the backward
            complete()
        return hyper

    return _solution_node(vjp, params, hparams, copy=public)


def implicit_solution(
    inner_loss: Loss,
    params: Tree,
    hparams: Tree,
    *,
    solver: Callable[..., SolveResult] = cg,
    on_failure: str = "warn",
    stationarity_tol: float | None = 1e-3,
    info: dict[str, Any] | None = None,
    products: str = "exact",
    fd_eps: float | None = None,
) -> Tree:
    """``params``' values as a differentiable function of ``hparams`` (an IFT autograd node).

    The forward returns copies of ``params`` (the inner optimum you computed any way you like);
    the backward maps an incoming ``v = dL/dparams`` to ``-(d2f/dhparams dparams) H^{-1} v``
    into ``hparams``. So the result composes with anything downstream (an unrolled
    fine-tuning, a validation loss) and ``loss.backward()`` fills ``hparams``' ``.grad``.
    No gradient flows into ``params`` themselves. Pass a dict as ``info`` to receive the
    diagnostics of the backward's solve (see :func:`implicit_grad`). ``products`` and
    ``fd_eps`` as in :func:`implicit_grad`.

    Checks: the forward validates ``params`` and ``hparams`` (one host read for NaN/inf); the
    backward reads its health signals once, as :func:`implicit_grad` does.

    Example:
        >>> import torch, hypergrad as hg
        >>> h = torch.tensor([3.0], requires_grad=True)
        >>> p_star = hg.implicit_solution(lambda p, h: 0.5 * ((p - h) ** 2).sum(), h.detach(), h)
        >>> (p_star ** 2).sum().backward(); h.grad
        tensor([6.])
    """
    _check_entry(inner_loss, params, hparams, solver, on_failure, stationarity_tol, products,
                 fd_eps)
    p_flat, h_flat = _check_trees(params, hparams)
    _check_node_entry("implicit_solution", "implicit_grad", info, h_flat)
    health = _checks.Health()
    health.add_finite("params", p_flat)
    health.add_finite("hparams", h_flat)
    health.read()
    health.raise_nonfinite("params", p_flat, "; a hypergradient at non-finite values is "
                           "meaningless")
    health.raise_nonfinite("hparams", h_flat)
    return _apply_implicit(inner_loss, params, hparams, solver=solver, on_failure=on_failure,
                           stationarity_tol=stationarity_tol, info=info, products=products,
                           public=True, fd_eps=fd_eps)


def _implicit_solution_fast(inner_loss: Loss, params: Tree, hparams: Tree, *,
                            solver: Callable[..., SolveResult], on_failure: str = "ignore",
                            stationarity_tol: float | None = None,
                            info: dict[str, Any] | None = None,
                            products: str = "exact",
                            fd_eps: float | None = None,
                            pending: list[PendingHealth] | None = None) -> Tree:
    """:func:`implicit_solution` for internal callers that validated their inputs (``params``
    and ``hparams`` non-empty floating tensor pytrees of one dtype/device, finite, some of
    ``hparams`` requiring grad; callables, policy, ``products`` and ``fd_eps`` checked): no
    host read in the forward, no scan for captured tensors in the backward; the backward's one
    health read stays, unless ``pending`` is a list: the backward then appends its
    :class:`PendingHealth` there, unread, for the caller to read with its own signals (and
    ``info`` is filled by ``complete()``)."""
    return _apply_implicit(inner_loss, params, hparams, solver=solver, on_failure=on_failure,
                           stationarity_tol=stationarity_tol, info=info, products=products,
                           public=False, fd_eps=fd_eps, pending=pending)
