"""The bad-input matrix: what a new user might pass to each public function, and what a good
answer to it is. Used by tests/test_errors.py (every case must be good) and runnable as a probe
against any version of the library (issue 13: before/after counts):

    PYTHONPATH=<checkout> python -m tests.bad_inputs [--json out.json]

Each case is a call and a regex. The response is classified as
- good: an error of an expected type whose message matches the regex (it names the argument or
  the place where NaN/inf appeared, or the fix), or, where a case allows it, a warning that
  matches the regex (the result is then flagged), or a result the case's ``flagged`` check
  accepts (a solver reporting ``converged=False``: solvers report, they never raise);
- poor: an error that does not match (a deep torch traceback, the wrong argument, advice that
  does not help) or a warning that does not match;
- silent: no error, no warning, and a result nobody flagged.
A user's own exception (a loss that raises) must come through unchanged: ``errors`` and
``expect`` then name that exception.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import hypergrad as hg
from hypergrad import testing

D = torch.float64
NAN, INF = float("nan"), float("inf")
P = {"w": torch.zeros(3, dtype=D)}
H = {"h": torch.ones(2, dtype=D)}
META = torch.device("meta")
DoubleBackward = getattr(hg, "DoubleBackwardError", RuntimeError)


def F32(x):
    return torch.tensor(x, dtype=torch.float32)


@dataclass
class Case:
    name: str
    call: Callable[[], Any]
    expect: str
    errors: tuple[type[BaseException], ...] = (ValueError, TypeError)
    warn: bool = False  # a matching HypergradientWarning is a good answer
    flagged: Callable[[Any], bool] | None = None  # a result this accepts is a good answer
    pending: str | None = None  # owner of a fix that has not landed on main yet


# ---- building blocks ---------------------------------------------------------------------------


def f(p, h):
    return (h["h"].sum() * (p["w"] - 1.0) ** 2).sum()


def L(p, h):
    return p["w"].sum() + h["h"].sum()


def A(v):
    return 2.0 * v


def b3():
    return torch.ones(3, dtype=D)


def with_value(tree_, value):
    return hg.tree.map(lambda x: torch.full_like(x, value), tree_)


def with_one(tree_, value):
    """``tree_`` with one entry of its first leaf set to ``value``."""
    out = hg.tree.map(torch.clone, tree_)
    hg.tree.leaves(out)[0].view(-1)[-1] = value
    return out


def hreq(h=H):
    return hg.tree.detach(h, requires_grad=True)


def optimum():
    return {"w": torch.ones(3, dtype=D)}


def backward_through_solution(inner=f, outer=lambda p: p["w"].sum(), params=None, **kw):
    h = hreq()
    out = hg.implicit_solution(inner, optimum() if params is None else params, h, **kw)
    outer(out).backward()
    return h["h"].grad


def unroll_with(step, steps=3, **kw):
    return hg.unroll(step, P, hreq(), steps, **kw)


def identity_step(p, h, t):
    return p


def user_error(*args, **kwargs):
    raise KeyError("user-code-error")


def not_converged(res) -> bool:
    return isinstance(res, hg.SolveResult) and not bool(res.converged)


def curvature_flagged(res) -> bool:
    stats = (res.stats or {}) if isinstance(res, hg.SolveResult) else {}
    return not_converged(res) or bool(stats.get("nonpositive_curvature", False))


def least_squares():
    """An overparameterised least-squares inner problem: singular PSD Hessian (rank 5 of 10)."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 10, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
    Xv, yv = torch.randn(8, 10, generator=g, dtype=D), torch.randn(8, generator=g, dtype=D)
    inner = lambda w, h: ((X @ w - y * h.sum()) ** 2).mean() / 2  # noqa: E731
    outer = lambda w, h: ((Xv @ w - yv) ** 2).mean() / 2  # noqa: E731
    return inner, outer, torch.linalg.pinv(X) @ y, torch.ones(1, dtype=D)


def ill_conditioned():
    prob = testing.quadratic_problem(seed=0, n_params=100, n_hparams=3, cond=1e8)
    return prob.inner_loss, prob.outer_loss, prob.params, prob.hparams


def saddle():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=D))
    Am = (q * torch.tensor([-1.0, 1.0, 2.0, 3.0, 4.0], dtype=D)) @ q.T
    B = torch.randn(5, 2, generator=g, dtype=D)
    h = torch.randn(2, generator=g, dtype=D)
    inner = lambda p, h: 0.5 * p @ Am @ p - p @ (B @ h)  # noqa: E731
    return inner, lambda p, h: (p**2).sum(), torch.linalg.solve(Am, B @ h), h


def sdpa_inner(p, h):
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 8, dtype=torch.float32).reshape(2, 3, 4, 8)
    q = x @ p["w"]
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    return (out**2).mean() + (h * p["w"] ** 2).sum()


def sdpa_params():
    return {"w": torch.eye(8, dtype=torch.float32)}


def module_capture():
    """An inner loss that reads a module's own parameters through its closure."""
    prob = testing.ridge_problem(seed=0, n_features=4)
    layer = torch.nn.Linear(4, 1).double()
    inner = lambda w, h: prob.inner_loss(w, h) + 1e-3 * (layer(w[None]) ** 2).sum()  # noqa
    return inner, prob.outer_loss, prob.params, prob.hparams


def ridge():
    prob = testing.ridge_problem(seed=0, n_features=4)
    return prob.inner_loss, prob.outer_loss, prob.params, prob.hparams


def fig(inner=None, outer=None, params=None, hparams=None, **kw):
    i, o, p, h = ridge()
    return hg.functional_implicit_grad(inner or i, outer or o, p if params is None else params,
                                       h if hparams is None else hparams, **kw)


def lr_step(lr):
    return hg.gradient_step(lambda p, h: 0.5 * (p["w"] ** 2).sum() * h["h"].sum(), lr=lr)


NAN_INNER = lambda p, h: f(p, h) * torch.tensor(NAN, dtype=D)  # noqa: E731
DETACHED_INNER = lambda p, h: f(hg.tree.detach(p), h)  # noqa: E731
INF_GRAD_INNER = lambda p, h: f(p, h) + (p["w"] - 1.0).abs().sqrt().sum()  # noqa: E731
NAN_OUTER = lambda p, h: L(p, h) * torch.tensor(NAN, dtype=D)  # noqa: E731
FLOAT_LOSS = lambda p, h: 1.0  # noqa: E731


# ---- the cases ---------------------------------------------------------------------------------

CASES: list[Case] = [
    # ---- hvp / make_hvp / mixed_vjp / HessianOperator ----
    Case("hvp-v-structure", lambda: hg.hvp(f, P, {"x": torch.ones(3)}, H), "`v`"),
    Case("hvp-v-shape", lambda: hg.hvp(f, P, {"w": torch.ones(4)}, H), "`v`"),
    Case("hvp-v-dtype", lambda: hg.hvp(f, P, {"w": torch.ones(3).float()}, H), "`v`.*float32"),
    Case("hvp-v-device", lambda: hg.hvp(f, P, {"w": torch.ones(3, dtype=D, device=META)}, H),
         "`v`.*meta"),
    Case("hvp-v-int", lambda: hg.hvp(f, P, {"w": torch.ones(3, dtype=torch.int64)}, H),
         "`v`.*floating"),
    Case("hvp-v-nan", lambda: hg.hvp(f, P, with_one(P, NAN), H), "`v`.*NaN"),
    Case("hvp-v-inf", lambda: hg.hvp(f, P, with_value(P, INF), H), "`v`.*NaN/inf"),
    Case("hvp-v-empty", lambda: hg.hvp(f, P, {}, H), "`v`"),
    Case("hvp-fn-nonscalar", lambda: hg.hvp(lambda p: p["w"] ** 2, P, P), "`fn`.*scalar"),
    Case("hvp-fn-returns-float", lambda: hg.hvp(lambda p: 1.0, P, P), "`fn`"),
    Case("hvp-fn-int-loss", lambda: hg.hvp(lambda p: torch.tensor(1), P, P), "`fn`.*floating"),
    Case("hvp-fn-not-callable", lambda: hg.hvp("f", P, P), "`fn`"),
    Case("hvp-fn-raises", lambda: hg.hvp(user_error, P, P), "user-code-error",
         errors=(KeyError,)),
    Case("hvp-fn-nan-value", lambda: hg.hvp(NAN_INNER, P, P, H), "`fn`.*NaN/inf"),
    Case("hvp-fn-inf-gradient", lambda: hg.hvp(INF_GRAD_INNER, optimum(), P, H),
         "gradient of `fn`.*NaN/inf"),
    Case("hvp-fn-detached", lambda: hg.hvp(DETACHED_INNER, P, P, H), "`params`"),
    Case("hvp-fn-constant", lambda: hg.hvp(lambda p: torch.tensor(3.0), P, P), "`params`"),
    Case("hvp-params-nan", lambda: hg.hvp(f, with_value(P, NAN), P, H), "`params`.*NaN"),
    Case("hvp-params-int", lambda: hg.hvp(f, {"w": torch.zeros(3, dtype=torch.int64)}, P, H),
         "`params`.*floating"),
    Case("hvp-params-empty", lambda: hg.hvp(f, {}, {}, H), "`params`.*non-empty"),
    Case("hvp-params-non-tensor", lambda: hg.hvp(f, {"w": [0.0, 1.0]}, P, H),
         "`params`.*only tensors"),
    Case("hvp-no-double-backward",
         lambda: hg.hvp(lambda p: sdpa_inner(p, F32(0.1)), sdpa_params(),
                        sdpa_params()), "finite_difference", errors=(DoubleBackward,)),
    Case("make_hvp-v-dtype", lambda: hg.make_hvp(f, P, H)({"w": torch.ones(3).half()}), "`v`"),
    Case("make_hvp-v-structure", lambda: hg.make_hvp(f, P, H)([torch.ones(3, dtype=D)]), "`v`"),
    Case("make_hvp-params-nan", lambda: hg.make_hvp(f, with_one(P, NAN), H), "`params`.*NaN"),
    Case("make_hvp-loss-nan", lambda: hg.make_hvp(NAN_INNER, P, H), "`fn`.*NaN/inf"),
    Case("make_hvp-gradient-inf", lambda: hg.make_hvp(INF_GRAD_INNER, optimum(), H),
         "gradient of `fn`.*NaN/inf"),
    Case("make_hvp-detached", lambda: hg.make_hvp(DETACHED_INNER, P, H), "`params`"),
    Case("make_hvp-mixed-without-hparams",
         lambda: hg.make_hvp(f, P, H).mixed_vjp(P), "`mixed_vjp` needs `hparams`"),
    Case("make_hvp-not-callable", lambda: hg.make_hvp(None, P), "`fn`"),
    Case("mixed-hparams-inf", lambda: hg.mixed_vjp(f, P, with_value(H, INF), P),
         "`hparams`.*NaN"),
    Case("mixed-v-structure", lambda: hg.mixed_vjp(f, P, H, [torch.ones(3)]), "`v`"),
    Case("mixed-v-dtype", lambda: hg.mixed_vjp(f, P, H, {"w": torch.ones(3).float()}), "`v`"),
    Case("mixed-v-nan", lambda: hg.mixed_vjp(f, P, H, with_one(P, NAN)), "`v`.*NaN"),
    Case("mixed-hparams-int",
         lambda: hg.mixed_vjp(f, P, {"h": torch.ones(2, dtype=torch.int64)}, P), "`hparams`"),
    Case("mixed-hparams-empty", lambda: hg.mixed_vjp(f, P, {}, P), "`hparams`"),
    Case("mixed-fn-detached", lambda: hg.mixed_vjp(DETACHED_INNER, P, H, P), "`params`"),
    Case("operator-hparams-non-tensor",
         lambda: hg.HessianOperator(f, P, {"h": 1.0}, ()), "`hparams`.*only tensors"),
    # ---- cg ----
    Case("cg-b-nan", lambda: hg.cg(A, torch.tensor([1.0, NAN], dtype=D)), "`b`.*NaN",
         flagged=not_converged),
    Case("cg-b-int", lambda: hg.cg(A, torch.tensor([1, 2])), "`b`"),
    Case("cg-b-empty", lambda: hg.cg(A, {}), "`b`"),
    Case("cg-b-list-of-floats", lambda: hg.cg(A, [1.0, 2.0]), "`b`"),
    Case("cg-damping-negative", lambda: hg.cg(A, b3(), damping=-0.1), "`damping`.*>= 0"),
    Case("cg-damping-nan", lambda: hg.cg(A, b3(), damping=NAN), "`damping`"),
    Case("cg-damping-inf", lambda: hg.cg(A, b3(), damping=INF), "`damping`"),
    Case("cg-maxiter-negative", lambda: hg.cg(A, b3(), maxiter=-1), "`maxiter`.*>= 0"),
    Case("cg-maxiter-float", lambda: hg.cg(A, b3(), maxiter=2.5), "`maxiter`.*int"),
    Case("cg-maxiter-bool", lambda: hg.cg(A, b3(), maxiter=True), "`maxiter`"),
    Case("cg-tol-negative", lambda: hg.cg(A, b3(), tol=-1e-6), "`tol`"),
    Case("cg-tol-nan", lambda: hg.cg(A, b3(), tol=NAN), "`tol`"),
    Case("cg-x0-structure", lambda: hg.cg(A, b3(), x0=[b3()]), "`x0`"),
    Case("cg-x0-shape", lambda: hg.cg(A, b3(), x0=torch.ones(4, dtype=D)), "`x0`"),
    Case("cg-x0-dtype", lambda: hg.cg(A, b3(), x0=b3().float()), "`x0`"),
    Case("cg-x0-inf", lambda: hg.cg(A, b3(), x0=torch.full((3,), INF, dtype=D)), "`x0`"),
    Case("cg-matvec-not-callable", lambda: hg.cg(None, b3()), "`matvec`"),
    Case("cg-matvec-structure", lambda: hg.cg(lambda v: {"v": v}, b3()), "`matvec`"),
    Case("cg-matvec-shape-damped", lambda: hg.cg(lambda v: v[:2], b3(), damping=0.1),
         "`matvec`"),
    Case("cg-matvec-raises", lambda: hg.cg(user_error, b3()), "user-code-error",
         errors=(KeyError,)),
    Case("cg-zero-operator", lambda: hg.cg(lambda v: 0 * v, b3()), "", flagged=curvature_flagged),
    Case("cg-indefinite", lambda: hg.cg(lambda v: -v, b3()), "", flagged=curvature_flagged),
    Case("cg-singular-inconsistent",
         lambda: hg.cg(lambda v: v * torch.tensor([1.0, 1.0, 0.0], dtype=D), b3()), "",
         flagged=curvature_flagged),
    Case("cg-matvec-nan", lambda: hg.cg(lambda v: v * NAN, b3()), "", flagged=not_converged),
    # ---- neumann / power iteration ----
    Case("neumann-iterations-negative", lambda: hg.neumann(A, b3(), iterations=-2, alpha=0.1),
         "`iterations`"),
    Case("neumann-alpha-zero", lambda: hg.neumann(A, b3(), alpha=0.0), "`alpha`.*> 0"),
    Case("neumann-alpha-negative", lambda: hg.neumann(A, b3(), alpha=-0.5), "`alpha`.*> 0"),
    Case("neumann-alpha-nan", lambda: hg.neumann(A, b3(), alpha=NAN), "`alpha`"),
    Case("neumann-alpha-inf", lambda: hg.neumann(A, b3(), alpha=INF), "`alpha`"),
    Case("neumann-alpha-bad-string", lambda: hg.neumann(A, b3(), alpha="bad"), "`alpha`.*'auto'"),
    Case("neumann-alpha-bool", lambda: hg.neumann(A, b3(), alpha=True), "`alpha`"),
    Case("neumann-b-inf", lambda: hg.neumann(A, torch.tensor([INF, 1.0], dtype=D), alpha=0.1),
         "`b`", flagged=not_converged),
    Case("neumann-b-empty", lambda: hg.neumann(A, [], alpha=0.1), "`b`"),
    Case("neumann-tol-negative", lambda: hg.neumann(A, b3(), tol=-1.0), "`tol`"),
    Case("neumann-power-iterations-zero", lambda: hg.neumann(A, b3(), power_iterations=0),
         "`power_iterations`"),
    Case("neumann-matvec-structure", lambda: hg.neumann(lambda v: (v,), b3(), alpha=0.1),
         "`matvec`"),
    Case("neumann-diverges", lambda: hg.neumann(A, b3(), iterations=50, alpha=10.0), "",
         flagged=not_converged),
    Case("neumann-indefinite-auto", lambda: hg.neumann(lambda v: -v, b3(), iterations=5), "",
         flagged=curvature_flagged),
    Case("neumann-preconditioner-negative",
         lambda: hg.neumann(A, b3(), alpha=0.1, preconditioner=-b3()), "`preconditioner`"),
    Case("neumann-preconditioner-structure",
         lambda: hg.neumann(A, b3(), alpha=0.1, preconditioner=[b3()]), "`preconditioner`"),
    Case("power-iteration-zero-iterations", lambda: hg.power_iteration(A, b3(), iterations=0),
         "`iterations`"),
    Case("power-iteration-zero-start", lambda: hg.power_iteration(A, torch.zeros(3, dtype=D)),
         "`v0`"),
    # ---- minres / gmres / normal_cg / nystrom / adam_preconditioner ----
    Case("minres-zero-operator", lambda: hg.minres(lambda v: 0 * v, b3()), "",
         flagged=not_converged),
    Case("minres-maxiter-negative", lambda: hg.minres(A, b3(), maxiter=-1), "`maxiter`"),
    Case("minres-b-int", lambda: hg.minres(A, torch.tensor([1, 2])), "`b`"),
    Case("minres-damping-negative", lambda: hg.minres(A, b3(), damping=-1.0), "`damping`"),
    Case("gmres-restart-zero", lambda: hg.gmres(A, b3(), restart=0), "`restart`"),
    Case("gmres-zero-operator", lambda: hg.gmres(lambda v: 0 * v, b3()), "",
         flagged=not_converged),
    Case("gmres-matvec-not-callable", lambda: hg.gmres(3, b3()), "`matvec`"),
    Case("normal-cg-rmatvec-not-callable", lambda: hg.normal_cg(A, b3(), rmatvec=1),
         "`rmatvec`"),
    Case("normal-cg-tol-negative", lambda: hg.normal_cg(A, b3(), tol=-1.0), "`tol`"),
    Case("nystrom-rank-zero", lambda: hg.nystrom(A, b3(), rank=0), "`rank`"),
    Case("nystrom-rho-zero", lambda: hg.nystrom(A, b3(), rho=0.0), "`rho`"),
    Case("adam-preconditioner-not-an-optimizer",
         lambda: hg.adam_preconditioner("adam", P), "`optimizer`"),
    # ---- implicit_grad ----
    Case("ig-inner-not-callable", lambda: hg.implicit_grad(1, L, P, H), "`inner_loss`"),
    Case("ig-outer-not-callable", lambda: hg.implicit_grad(f, None, P, H), "`outer_loss`"),
    Case("ig-solver-not-callable", lambda: hg.implicit_grad(f, L, P, H, solver="cg"),
         "`solver`"),
    Case("ig-solver-wrong-return",
         lambda: hg.implicit_grad(f, L, P, H, solver=lambda m, b: (b, 0)),
         "`solver`.*SolveResult"),
    Case("ig-solver-raises", lambda: hg.implicit_grad(f, L, optimum(), H, solver=user_error),
         "user-code-error", errors=(KeyError,)),
    Case("ig-inner-nonscalar",
         lambda: hg.implicit_grad(lambda p, h: p["w"] * h["h"].sum(), L, P, H),
         "`inner_loss`.*scalar"),
    Case("ig-outer-nonscalar", lambda: hg.implicit_grad(f, lambda p, h: p["w"], P, H),
         "`outer_loss`.*scalar"),
    Case("ig-inner-returns-float", lambda: hg.implicit_grad(FLOAT_LOSS, L, P, H),
         "`inner_loss`"),
    Case("ig-outer-returns-float", lambda: hg.implicit_grad(f, FLOAT_LOSS, optimum(), H),
         "`outer_loss`"),
    Case("ig-inner-raises", lambda: hg.implicit_grad(user_error, L, P, H), "user-code-error",
         errors=(KeyError,)),
    Case("ig-params-nan", lambda: hg.implicit_grad(f, L, with_value(P, NAN), H),
         "`params`.*NaN"),
    Case("ig-hparams-inf", lambda: hg.implicit_grad(f, L, P, with_value(H, -INF)),
         "`hparams`.*NaN"),
    Case("ig-params-empty", lambda: hg.implicit_grad(f, L, {}, H), "`params`"),
    Case("ig-params-int",
         lambda: hg.implicit_grad(f, L, {"w": torch.zeros(3, dtype=torch.int64)}, H),
         "`params`.*floating"),
    Case("ig-hparams-none", lambda: hg.implicit_grad(f, L, P, None), "`hparams`"),
    Case("ig-dtype-mix",
         lambda: hg.implicit_grad(f, L, P, hg.tree.map(torch.Tensor.float, H)),
         "`hparams`.*float32.*`params`.*float64"),
    Case("ig-device-mix",
         lambda: hg.implicit_grad(f, L, P, {"h": torch.ones(2, dtype=D, device=META)}),
         "`hparams`.*meta"),
    Case("ig-hparams-int",
         lambda: hg.implicit_grad(f, L, P, {"h": torch.ones(2, dtype=torch.int64)}),
         "`hparams`"),
    Case("ig-hparams-empty", lambda: hg.implicit_grad(f, L, P, {}), "`hparams`"),
    Case("ig-on-failure", lambda: hg.implicit_grad(f, L, P, H, on_failure="sometimes"),
         "`on_failure`.*'warn'"),
    Case("ig-on-failure-none", lambda: hg.implicit_grad(f, L, P, H, on_failure=None),
         "`on_failure`"),
    Case("ig-stationarity-tol", lambda: hg.implicit_grad(f, L, P, H, stationarity_tol=-1.0),
         "`stationarity_tol`"),
    Case("ig-stationarity-tol-nan",
         lambda: hg.implicit_grad(f, L, P, H, stationarity_tol=NAN), "`stationarity_tol`"),
    Case("ig-outer-gradient-inf",
         lambda: hg.implicit_grad(f, lambda p, h: p["w"].sqrt().sum(), P, H),
         "gradient of `outer_loss`"),
    Case("ig-inner-nan", lambda: hg.implicit_grad(NAN_INNER, L, optimum(), H),
         "`inner_loss`.*NaN/inf"),
    Case("ig-inner-gradient-inf", lambda: hg.implicit_grad(INF_GRAD_INNER, L, optimum(), H),
         "gradient of `inner_loss`.*NaN/inf"),
    Case("ig-outer-nan", lambda: hg.implicit_grad(f, NAN_OUTER, optimum(), H),
         "`outer_loss`.*NaN/inf"),
    Case("ig-inner-detached", lambda: hg.implicit_grad(DETACHED_INNER, L, optimum(), H),
         "`params`"),
    Case("ig-singular-hessian", lambda: hg.implicit_grad(*least_squares()), r"damping=\d",
         warn=True),
    Case("ig-ill-conditioned", lambda: hg.implicit_grad(*ill_conditioned()), r"damping=\d",
         warn=True),
    Case("ig-saddle", lambda: hg.implicit_grad(*saddle()), "non-positive curvature", warn=True),
    Case("ig-not-stationary", lambda: hg.implicit_grad(f, L, P, H), "not a stationary point",
         warn=True),
    Case("ig-neumann-diverges",
         lambda: hg.implicit_grad(f, L, optimum(), H,
                                  solver=functools.partial(hg.neumann, alpha=10.0)),
         "alpha", warn=True),
    Case("ig-solver-returns-nan",
         lambda: hg.implicit_grad(f, L, optimum(), H, solver=lambda m, b: hg.SolveResult(
             with_value(b, NAN), torch.tensor(1), torch.tensor(0.0), torch.tensor(True))),
         "NaN/inf", warn=True),
    Case("ig-captured-parameter", lambda: hg.implicit_grad(*module_capture()),
         "neither `params` nor `hparams`", warn=True),
    Case("ig-no-double-backward",
         lambda: hg.implicit_grad(sdpa_inner, lambda p, h: p["w"].sum(), sdpa_params(),
                                  F32(0.1)), "finite_difference",
         errors=(DoubleBackward,)),
    Case("ig-products-unknown", lambda: hg.implicit_grad(f, L, optimum(), H, products="fd"),
         "`products`"),
    Case("ig-fd-inner-nan",
         lambda: hg.implicit_grad(NAN_INNER, L, optimum(), H, products="finite_difference"),
         "`inner_loss`.*NaN/inf"),
    Case("ig-fd-inner-detached",
         lambda: hg.implicit_grad(DETACHED_INNER, L, optimum(), H,
                                  products="finite_difference"), "`params`"),
    Case("ig-fd-captured-parameter",
         lambda: hg.implicit_grad(*module_capture(), products="finite_difference"),
         "neither `params` nor `hparams`", warn=True),
    # ---- implicit_solution ----
    Case("is-hparams-no-grad", lambda: hg.implicit_solution(f, P, H), "`hparams`.*require grad"),
    Case("is-dtype-mix",
         lambda: hg.implicit_solution(f, P, hreq(hg.tree.map(torch.Tensor.float, H))),
         "`hparams`.*float32"),
    Case("is-params-inf", lambda: hg.implicit_solution(f, with_value(P, INF), hreq()),
         "`params`"),
    Case("is-hparams-nan", lambda: hg.implicit_solution(f, P, hreq(with_value(H, NAN))),
         "`hparams`"),
    Case("is-params-empty", lambda: hg.implicit_solution(f, {}, hreq()), "`params`"),
    Case("is-params-int",
         lambda: hg.implicit_solution(f, {"w": torch.zeros(3, dtype=torch.int64)}, hreq()),
         "`params`"),
    Case("is-on-failure", lambda: hg.implicit_solution(f, P, hreq(), on_failure="loud"),
         "`on_failure`"),
    Case("is-products-unknown", lambda: hg.implicit_solution(f, P, hreq(), products=None),
         "`products`"),
    Case("is-stationarity-tol", lambda: hg.implicit_solution(f, P, hreq(), stationarity_tol=-1),
         "`stationarity_tol`"),
    Case("is-info-not-dict", lambda: hg.implicit_solution(f, P, hreq(), info=[]), "`info`"),
    Case("is-inner-not-callable", lambda: hg.implicit_solution(None, P, hreq()), "`inner_loss`"),
    Case("is-solver-not-callable", lambda: hg.implicit_solution(f, P, hreq(), solver=3),
         "`solver`"),
    Case("is-solver-wrong-return", lambda: backward_through_solution(solver=lambda m, b: b),
         "`solver`.*SolveResult"),
    Case("is-inner-nonscalar",
         lambda: backward_through_solution(inner=lambda p, h: p["w"] * h["h"].sum()),
         "`inner_loss`"),
    Case("is-incoming-gradient-inf",
         lambda: backward_through_solution(outer=lambda p: (p["w"] - 1).sqrt().sum()),
         "gradient arriving at implicit_solution"),
    Case("is-inner-nan", lambda: backward_through_solution(inner=NAN_INNER),
         "`inner_loss`.*NaN/inf"),
    Case("is-inner-detached", lambda: backward_through_solution(inner=DETACHED_INNER),
         "`params`"),
    Case("is-not-stationary", lambda: backward_through_solution(params=P),
         "not a stationary point", warn=True),
    Case("is-singular-hessian",
         lambda: (lambda i, o, w, h: o(hg.implicit_solution(i, w, h.requires_grad_()), h)
                  .backward())(*least_squares()), r"damping=\d", warn=True),
    Case("is-no-double-backward",
         lambda: hg.implicit_solution(sdpa_inner, sdpa_params(),
                                      F32(0.1).requires_grad_())["w"].sum()
         .backward(), "finite_difference", errors=(DoubleBackward,)),
    # ---- functional_implicit_grad ----
    Case("fig-params-nan", lambda: fig(params=torch.full((4,), NAN, dtype=D)), "`params`.*NaN"),
    Case("fig-hparams-inf", lambda: fig(hparams=torch.full((4,), INF, dtype=D)),
         "`hparams`.*NaN"),
    Case("fig-params-empty", lambda: fig(params={}), "`params`"),
    Case("fig-hparams-empty", lambda: fig(hparams={}), "`hparams`"),
    Case("fig-dtype-mix", lambda: fig(hparams=torch.zeros(4, dtype=torch.float32)),
         "`hparams`.*float32"),
    Case("fig-params-int", lambda: fig(params=torch.zeros(4, dtype=torch.int64)),
         "`params`.*floating"),
    Case("fig-inner-nonscalar", lambda: fig(inner=lambda p, h: p * h), "`inner_loss`.*scalar"),
    Case("fig-outer-nonscalar", lambda: fig(outer=lambda p, h: p), "`outer_loss`.*scalar"),
    Case("fig-inner-returns-float", lambda: fig(inner=FLOAT_LOSS), "`inner_loss`"),
    Case("fig-inner-nan", lambda: fig(inner=lambda p, h: (p * h).sum() * NAN),
         "`inner_loss`.*NaN/inf"),
    Case("fig-neumann-diverges", lambda: fig(solver="neumann", alpha=1e6, iterations=200),
         "NaN/inf", warn=True),
    Case("fig-solver-callable", lambda: fig(solver=hg.cg), "`solver`"),
    Case("fig-iterations-zero", lambda: fig(iterations=0), "`iterations`"),
    Case("fig-iterations-float", lambda: fig(iterations=2.0), "`iterations`"),
    Case("fig-alpha-negative", lambda: fig(alpha=-1.0), "`alpha`"),
    Case("fig-damping-negative", lambda: fig(damping=-1.0), "`damping`"),
    Case("fig-tol-negative", lambda: fig(tol=-1.0), "`tol`"),
    # ---- unroll / gradient_step / optimizer_step ----
    Case("unroll-steps-lt-truncate", lambda: hg.unroll(identity_step, P, H, 3, truncate=5),
         "`truncate`.*`steps`"),
    Case("unroll-steps-negative", lambda: hg.unroll(identity_step, P, H, -1), "`steps`"),
    Case("unroll-steps-float", lambda: hg.unroll(identity_step, P, H, 3.0), "`steps`"),
    Case("unroll-truncate-negative", lambda: hg.unroll(identity_step, P, H, 3, truncate=-1),
         "`truncate`"),
    Case("unroll-truncate-float", lambda: hg.unroll(identity_step, P, H, 3, truncate=1.0),
         "`truncate`"),
    Case("unroll-checkpoint-zero", lambda: hg.unroll(identity_step, P, H, 3, checkpoint_every=0),
         "`checkpoint_every`"),
    Case("unroll-step-not-callable", lambda: hg.unroll(None, P, H, 3), "`step`"),
    Case("unroll-step-structure", lambda: unroll_with(lambda p, h, t: [p["w"]]),
         "`step`.*structure"),
    Case("unroll-step-structure-truncated", lambda: unroll_with(lambda p, h, t: (p,), truncate=1),
         "`step`"),
    Case("unroll-step-structure-checkpointed",
         lambda: unroll_with(lambda p, h, t: {"v": p["w"]}, checkpoint_every=2), "`step`"),
    Case("unroll-step-raises", lambda: unroll_with(user_error), "user-code-error",
         errors=(KeyError,)),
    Case("unroll-step-changes-dtype",
         lambda: unroll_with(lambda p, h, t: hg.tree.map(torch.Tensor.float, p)),
         "`step`.*dtype", errors=(TypeError, ValueError)),
    Case("unroll-step-changes-shape",
         lambda: unroll_with(lambda p, h, t: {"w": torch.cat([p["w"], p["w"]])}),
         "`step`.*shape"),
    Case("unroll-params-nan", lambda: hg.unroll(identity_step, with_value(P, NAN), H, 3),
         "`params`.*NaN"),
    Case("unroll-diverges-lr-1e200", lambda: hg.unroll(lr_step(1e200), optimum(), hreq(), 10),
         r"NaN/inf at step t=\d", errors=(FloatingPointError, ValueError)),
    Case("unroll-step-makes-nan",
         lambda: unroll_with(lambda p, h, t: with_value(p, NAN) if t == 1 else p),
         r"NaN/inf at step t=1", errors=(FloatingPointError, ValueError)),
    Case("gradient-step-lr-zero", lambda: hg.gradient_step(f, lr=0.0), "`lr`"),
    Case("gradient-step-lr-nan", lambda: hg.gradient_step(f, lr=NAN), "`lr`"),
    Case("gradient-step-lr-negative", lambda: hg.gradient_step(f, lr=-0.1), "`lr`"),
    Case("gradient-step-lr-string", lambda: hg.gradient_step(f, lr="0.1"), "`lr`"),
    Case("gradient-step-loss-not-callable", lambda: hg.gradient_step("f", lr=0.1),
         "`inner_loss`"),
    Case("gradient-step-loss-nonscalar",
         lambda: unroll_with(hg.gradient_step(lambda p, h: p["w"] * 2, lr=0.1)),
         "`inner_loss`.*scalar"),
    Case("gradient-step-loss-nan", lambda: unroll_with(hg.gradient_step(NAN_INNER, lr=0.1)),
         r"NaN/inf at step t=0", errors=(FloatingPointError, ValueError)),
    Case("optimizer-step-not-optimizer", lambda: hg.optimizer_step(f, torch.optim.SGD),
         "`optimizer`"),
    Case("optimizer-step-none", lambda: hg.optimizer_step(f, None), "`optimizer`"),
    Case("optimizer-step-loss-not-callable",
         lambda: hg.optimizer_step(None, __import__("torchopt").sgd(lr=0.1)), "`inner_loss`"),
    # ---- tree / testing ----
    Case("tree-add-structure", lambda: hg.tree.add(P, H), "`a` and `b`"),
    Case("tree-vdot-shape", lambda: hg.tree.vdot(P, {"w": torch.ones(2, 3)}), "`a` and `b`"),
    Case("tree-axpy-structure", lambda: hg.tree.axpy(2.0, P, H), "`x` and `y`"),
    Case("tree-ravel-mixed-dtype",
         lambda: hg.tree.ravel({"a": torch.ones(2, dtype=torch.float32),
                               "b": torch.ones(2, dtype=D)}),
         "one dtype"),
    Case("tree-ravel-empty", lambda: hg.tree.ravel({}), "non-empty"),
    Case("compare-structure", lambda: testing.compare(P, H), "`reference` and `approx`"),
    Case("testing-quadratic-no-params", lambda: testing.quadratic_problem(n_params=0),
         "`n_params`"),
    Case("testing-quadratic-cond-below-one", lambda: testing.quadratic_problem(cond=0.5),
         "`cond`"),
    Case("testing-ridge-no-features", lambda: testing.ridge_problem(n_features=0),
         "`n_features`"),
    Case("testing-dense-hessian-non-tensor",
         lambda: testing.dense_hessian(lambda p: p["w"].sum(), {"w": [1.0]}), "`params`"),
    Case("testing-reference-unroll-steps",
         lambda: testing.reference_unroll_grad(identity_step, P, H, -1, L), "`steps`"),
]


def classify(case: Case) -> tuple[str, str]:
    """``("good" | "poor" | "silent", what happened)`` for one case."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = case.call()
        except Exception as e:  # noqa: BLE001 - classifying any response is the point
            text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            good = isinstance(e, case.errors) and re.search(case.expect, str(e))
            return ("good" if good else "poor"), text
    messages = [str(w.message) for w in caught
                if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    if case.warn and any(re.search(case.expect, m) for m in messages):
        return "good", "warned: " + next(m for m in messages if re.search(case.expect, m))[:300]
    if case.flagged is not None and case.flagged(result):
        return "good", "flagged result"
    if messages:
        return "poor", "warned: " + " | ".join(m[:150] for m in messages)
    return "silent", "returned without error, warning or flag"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the per-case results here")
    parser.add_argument("--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = {}
    for case in CASES:
        verdict, detail = classify(case)
        rows[case.name] = {"verdict": verdict, "detail": detail}
        if args.verbose or verdict != "good":
            print(f"{verdict:7s} {case.name:40s} {detail}")
    counts = Counter(r["verdict"] for r in rows.values())
    summary = {"library": hg.__file__, "cases": len(CASES),
               **{k: counts.get(k, 0) for k in ("good", "poor", "silent")}}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "cases": rows}, fh, indent=1)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
