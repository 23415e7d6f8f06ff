"""fixed_point_grad / fixed_point_solution against references that do not use them.

References: a dense solve on ``torch.autograd.functional.jacobian`` of the map (contractive tanh
map, a DEQ-style layer) and the ridge closed form (``hypergrad.testing.ridge_problem``) for the
gradient-step map whose fixed point is the ridge solution. Everything in float64.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import hypergrad as hg
from hypergrad import testing

TIGHT = functools.partial(hg.gmres, tol=1e-13, maxiter=200)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _tanh_problem(n: int = 6, m: int = 3, scale: float = 0.8, seed: int = 0):
    """``T(x, h) = tanh(W x + U h + b)`` with ``||W||_2 = scale`` (< 1: a contraction)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g)
    W = scale * W / torch.linalg.matrix_norm(W, ord=2)
    U = torch.randn(n, m, generator=g)
    b = torch.randn(n, generator=g)
    h = torch.randn(m, generator=g)
    c = torch.randn(n, generator=g)

    def T(x, h):
        return torch.tanh(W @ x + U @ h + b)

    def L(x, h):
        return ((x - c) ** 2).sum() + 0.3 * (h**3).sum() + (x[0] * h[1])

    return T, L, h


def _iterate(T, h, n: int, iters: int = 400):
    x = torch.zeros(n)
    for _ in range(iters):
        x = T(x, h)
    return x


def _dense_reference(T, L, x, h):
    """dL/dh + (dT/dh)^T (I - dT/dx)^{-T} dL/dx with dense Jacobians (torch.autograd.functional)."""
    Jx, Jh = torch.autograd.functional.jacobian(T, (x, h))
    gx, gh = torch.autograd.functional.jacobian(L, (x, h))
    dxdh = torch.linalg.solve(torch.eye(len(x)) - Jx, Jh)
    return gh + dxdh.T @ gx


def test_tanh_map_matches_dense_jacobian_solve():
    T, L, h = _tanh_problem()
    x = _iterate(T, h, 6)
    ref = _dense_reference(T, L, x, h)
    got, info = hg.fixed_point_grad(T, L, x, h, solver=TIGHT, return_info=True)
    assert _rel(got, ref) < 1e-8
    assert info["trusted"] and bool(info["solve"].converged)
    assert float(info["fixed_point_residual"]) < 1e-14
    assert 0 < float(info["contraction"]) <= 0.8 + 1e-12  # ||tanh' W|| <= ||W|| = 0.8


def test_tanh_map_default_solver_reaches_its_tolerance():
    T, L, h = _tanh_problem()
    x = _iterate(T, h, 6)
    ref = _dense_reference(T, L, x, h)
    got, info = hg.fixed_point_grad(T, L, x, h, return_info=True)
    assert bool(info["solve"].converged)
    # the error is bounded by the solve's relative residual times cond(I - dT/dx) <= 1/(1-0.8)
    assert _rel(got, ref) <= 5 * float(info["solve"].residual_norm) + 1e-12


def test_pytree_map_matches_dense_reference():
    T, L, h = _tanh_problem(n=5, m=3, seed=3)
    x = _iterate(T, h, 5)

    def T_tree(xt, ht):
        y = T(torch.cat([xt["a"], xt["b"].reshape(-1)]), torch.cat([ht[0], ht[1]]))
        return {"a": y[:1], "b": y[1:].reshape(2, 2)}

    def L_tree(xt, ht):
        return L(torch.cat([xt["a"], xt["b"].reshape(-1)]), torch.cat([ht[0], ht[1]]))

    xt = {"a": x[:1], "b": x[1:].reshape(2, 2)}
    ht = (h[:2], h[2:])
    got = hg.fixed_point_grad(T_tree, L_tree, xt, ht, solver=TIGHT)
    ref = _dense_reference(T, L, x, h)
    assert isinstance(got, tuple) and len(got) == 2
    assert _rel(torch.cat(got), ref) < 1e-8


def test_ridge_gradient_step_map_matches_closed_form():
    prob = testing.ridge_problem(seed=2, n_features=7)
    X, y = prob.extras["X"], prob.extras["y"]
    n = X.shape[0]
    eta = 0.5

    def T(w, h):  # one gradient step on the ridge objective: its fixed point is w*
        return w - eta * (X.T @ (X @ w - y) / n + h.exp() * w)

    got, info = hg.fixed_point_grad(T, prob.outer_loss, prob.params, prob.hparams,
                                    solver=TIGHT, return_info=True)
    assert info["trusted"]
    assert _rel(got, prob.hypergrad) < 1e-8


def test_neumann_solver_is_the_classical_series():
    T, L, h = _tanh_problem()
    x = _iterate(T, h, 6)
    ref = _dense_reference(T, L, x, h)
    got = hg.fixed_point_grad(T, L, x, h, solver=functools.partial(
        hg.neumann, iterations=200, alpha=1.0, tol=1e-14))
    assert _rel(got, ref) < 1e-8


def test_solution_node_backward_equals_fixed_point_grad():
    T, L, h0 = _tanh_problem(seed=5)
    x = _iterate(T, h0, 6)
    h = h0.clone().requires_grad_(True)
    info: dict = {}
    xs = hg.fixed_point_solution(T, x, h, solver=TIGHT, info=info)
    assert not xs.requires_grad or xs.grad_fn is not None
    torch.testing.assert_close(xs.detach(), x, rtol=0, atol=0)
    L(xs, h).backward()
    ref = _dense_reference(T, L, x, h0)
    assert _rel(h.grad, ref) < 1e-8
    assert info["trusted"] and "fixed_point_residual" in info


def test_solution_composes_downstream_and_with_a_tuple():
    T, L, h0 = _tanh_problem(seed=6)
    x = _iterate(T, h0, 6)
    h = h0.clone().requires_grad_(True)
    (xs,) = hg.fixed_point_solution(lambda t, hh: (T(t[0], hh),), (x,), h, solver=TIGHT)
    # a downstream computation that is itself a function of x* and h
    (torch.sin(xs).sum() * h.sum()).backward()
    ref = _dense_reference(T, lambda a, b: torch.sin(a).sum() * b.sum(), x, h0)
    assert _rel(h.grad, ref) < 1e-8


def test_non_contractive_map_warns_or_raises():
    # T(x, h) = 2 x - h: the fixed point x* = h exists and I - dT/dx = -I is invertible (the
    # hypergradient is right), but T is expanding: iterating it would never find x*.
    T = lambda x, h: 2 * x - h  # noqa: E731
    L = lambda x, h: (x**2).sum()  # noqa: E731
    h = torch.tensor([0.5, -1.0])
    with pytest.warns(hg.HypergradientWarning, match="not contractive"):
        got, info = hg.fixed_point_grad(T, L, h.clone(), h, solver=TIGHT, return_info=True)
    torch.testing.assert_close(got, 2 * h)
    assert math.isclose(float(info["contraction"]), 2.0, rel_tol=1e-12)
    with pytest.raises(hg.HypergradientError, match="not contractive"):
        hg.fixed_point_grad(T, L, h.clone(), h, solver=TIGHT, on_failure="raise")
    hr = h.clone().requires_grad_(True)
    with pytest.raises(hg.HypergradientError, match="not contractive"):
        L(hg.fixed_point_solution(T, h.clone(), hr, on_failure="raise"), hr).backward()


def test_non_contractive_tanh_map_warns_and_is_still_exact_at_its_fixed_point():
    # ||W|| = 3: the fixed point found by Newton's method on x - T(x) is repelling, so iterating
    # T would not find it; the IFT still holds there (I - dT/dx is invertible).
    T, L, h = _tanh_problem(scale=3.0, seed=1)
    x = torch.zeros(6)
    for _ in range(100):
        J = torch.autograd.functional.jacobian(lambda t: t - T(t, h), x)
        x = x - torch.linalg.solve(J, x - T(x, h))
    assert float((T(x, h) - x).norm()) < 1e-14
    Jx = torch.autograd.functional.jacobian(lambda t: T(t, h), x)
    assert float(torch.linalg.matrix_norm(Jx, ord=2)) > 1
    with pytest.warns(hg.HypergradientWarning) as rec:
        got, info = hg.fixed_point_grad(T, L, x, h, solver=TIGHT, return_info=True)
    assert [str(w.message) for w in rec] == ["hypergradient may be wrong: " + info["reasons"][0]]
    assert "not contractive" in info["reasons"][0] and float(info["contraction"]) > 1
    assert _rel(got, _dense_reference(T, L, x, h)) < 1e-8


def test_not_a_fixed_point_warns_once_per_reason_and_ignore_is_silent(recwarn):
    T, L, h = _tanh_problem()
    x = _iterate(T, h, 6) + 0.1
    with pytest.warns(hg.HypergradientWarning, match="not a fixed point"):
        _, info = hg.fixed_point_grad(T, L, x, h, solver=TIGHT, return_info=True)
    assert not info["trusted"] and len(info["reasons"]) == 1
    recwarn.clear()
    hg.fixed_point_grad(T, L, x, h, solver=TIGHT, on_failure="ignore")
    assert not [w for w in recwarn if issubclass(w.category, hg.HypergradientWarning)]
    hg.fixed_point_grad(T, L, x, h, solver=TIGHT, fixed_point_tol=None)  # check skipped
    assert not [w for w in recwarn if issubclass(w.category, hg.HypergradientWarning)]


def test_unconverged_solve_warns():
    T, L, h = _tanh_problem()
    x = _iterate(T, h, 6)
    with pytest.warns(hg.HypergradientWarning, match="did not converge"):
        hg.fixed_point_grad(T, L, x, h, solver=functools.partial(hg.gmres, maxiter=1))


def test_singular_system_is_reported():
    T = lambda x, h: x + 0 * h  # noqa: E731  (every x is a fixed point: I - dT/dx = 0)
    with pytest.raises(hg.HypergradientError, match="did not converge"):
        hg.fixed_point_grad(T, lambda x, h: x.sum(), torch.ones(2), torch.ones(2),
                            on_failure="raise")


def test_map_without_hparams_dependence_gives_the_direct_term_only():
    T = lambda x, h: 0.5 * x  # noqa: E731
    L = lambda x, h: (x * h).sum() + (h**2).sum()  # noqa: E731
    h = torch.tensor([1.0, 2.0])
    got = hg.fixed_point_grad(T, L, torch.zeros(2), h, solver=TIGHT)
    torch.testing.assert_close(got, 2 * h)


# --- bad input --------------------------------------------------------------------------------
def _ok():
    T, L, h = _tanh_problem()
    return T, L, _iterate(T, h, 6), h


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda a: {**a, "fixed_point_map": 3}, TypeError, "fixed_point_map"),
        (lambda a: {**a, "outer_loss": None}, TypeError, "outer_loss"),
        (lambda a: {**a, "x": [1.0, 2.0]}, TypeError, "`x`"),
        (lambda a: {**a, "x": a["x"].float()}, TypeError, "hparams"),
        (lambda a: {**a, "hparams": torch.tensor([1, 2])}, TypeError, "hparams"),
        (lambda a: {**a, "x": a["x"] * float("nan")}, ValueError, "`x`"),
        (lambda a: {**a, "fixed_point_map": lambda x, h: x[:3]}, ValueError, "fixed_point_map"),
        (lambda a: {**a, "fixed_point_map": lambda x, h: {"x": x}}, ValueError, "like `x`"),
        (lambda a: {**a, "outer_loss": lambda x, h: x}, ValueError, "outer_loss"),
    ],
)
def test_bad_input_names_the_argument(mutate, err, match):
    T, L, x, h = _ok()
    args = mutate({"fixed_point_map": T, "outer_loss": L, "x": x, "hparams": h})
    with pytest.raises(err, match=match):
        hg.fixed_point_grad(args["fixed_point_map"], args["outer_loss"], args["x"],
                            args["hparams"])


def test_bad_options_name_the_argument():
    T, L, x, h = _ok()
    with pytest.raises(ValueError, match="on_failure"):
        hg.fixed_point_grad(T, L, x, h, on_failure="loud")
    with pytest.raises(ValueError, match="fixed_point_tol"):
        hg.fixed_point_grad(T, L, x, h, fixed_point_tol=-1.0)
    with pytest.raises(TypeError, match="solver"):
        hg.fixed_point_grad(T, L, x, h, solver="gmres")
    with pytest.raises(TypeError, match="SolveResult"):
        hg.fixed_point_grad(T, L, x, h, solver=lambda mv, b: b)
    with pytest.raises(ValueError, match="require grad"):
        hg.fixed_point_solution(T, x, h)
    with pytest.raises(TypeError, match="info"):
        hg.fixed_point_solution(T, x, h.clone().requires_grad_(), info=[])
    with pytest.raises(TypeError, match="torch.func"):
        torch.func.grad(lambda hh: hg.fixed_point_grad(T, L, x, hh).sum())(h)


def test_a_captured_tensor_that_requires_grad_is_reported():
    """jaxopt #31/#111: a weight the map closes over instead of taking it in ``hparams`` gets
    no gradient, silently. Here it is named (with its shape) and can be made an error."""
    T, L, h = _tanh_problem()
    x = _iterate(T, h, 6)
    W = torch.eye(6, requires_grad=True)
    T_capture = lambda x, h: T(W @ x, h)  # noqa: E731
    with pytest.warns(hg.HypergradientWarning, match=r"`fixed_point_map` uses 1 tensor.*\(6, 6\)"):
        hg.fixed_point_grad(T_capture, L, x, h, solver=TIGHT)
    with pytest.raises(hg.HypergradientError, match="neither `x` nor `hparams`"):
        hg.fixed_point_grad(T_capture, L, x, h, solver=TIGHT, on_failure="raise")
    hg.fixed_point_grad(lambda x, h: T(W.detach() @ x, h), L, x, h, solver=TIGHT,
                        on_failure="raise")  # detached: nothing to report
