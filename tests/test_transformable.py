"""functional_implicit_grad: the IFT under torch.func.vmap / jacrev (issue: transformable)."""

from __future__ import annotations

import pytest
import torch

import hypergrad as hg
from hypergrad import testing

D = torch.float64


def _ridge(seed: int = 0, n: int = 6):
    prob = testing.ridge_problem(seed=seed, n_features=n)
    X, y = prob.extras["X"], prob.extras["y"]

    def w_star(h):  # closed-form inner optimum, differentiable in h
        A = X.T @ X / len(X) + torch.diag(h.exp())
        return torch.linalg.solve(A, X.T @ y / len(X))

    return prob, w_star


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_matches_closed_form(solver):
    prob, _ = _ridge(seed=1)
    kw = {"iterations": 30, "tol": 1e-14} if solver == "cg" else {"iterations": 3000, "alpha": 0.5}
    g = hg.functional_implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                                    solver=solver, **kw)
    assert testing.compare(g, prob.hypergrad).rel_error < (1e-10 if solver == "cg" else 1e-6)


def test_vmap_over_8_hyperparameter_settings_equals_python_loop():
    prob, w_star = _ridge(seed=2)
    hs = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=D) - 1.0
    ws = torch.stack([w_star(h) for h in hs])

    def one(w, h):
        return hg.functional_implicit_grad(prob.inner_loss, prob.outer_loss, w, h,
                                           iterations=30, tol=1e-14)

    batched = torch.func.vmap(one)(ws, hs)
    loop = torch.stack([
        hg.implicit_grad(prob.inner_loss, prob.outer_loss, w, h,
                         solver=lambda mv, b: hg.cg(mv, b, tol=1e-14, maxiter=30))
        for w, h in zip(ws, hs)
    ])
    assert testing.compare(batched, loop).rel_error < 1e-10


def test_jacrev_of_the_hypergradient_is_the_hessian_of_the_value_function():
    prob, w_star = _ridge(seed=3, n=4)

    def value(h):  # g(h) = L(w*(h)), exact
        return prob.outer_loss(w_star(h), h)

    def hypergrad(h):
        return hg.functional_implicit_grad(prob.inner_loss, prob.outer_loss, w_star(h), h,
                                           iterations=20, tol=1e-14)

    h = prob.hparams
    torch.testing.assert_close(hypergrad(h), torch.func.grad(value)(h))
    torch.testing.assert_close(torch.func.jacrev(hypergrad)(h), torch.func.hessian(value)(h))


def test_masked_cg_stops_updating_converged_lanes():
    # a 2x2 system converges in 2 CG steps; 50 more masked steps must not produce NaN
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=D)
    f = lambda p, h: 0.5 * p @ A @ p - p @ h  # noqa: E731
    L = lambda p, h: p.sum()  # noqa: E731
    h = torch.tensor([1.0, -1.0], dtype=D)
    g = hg.functional_implicit_grad(f, L, torch.linalg.solve(A, h), h, iterations=50)
    torch.testing.assert_close(g, torch.linalg.solve(A, torch.ones(2, dtype=D)))


def test_autograd_implicit_grad_under_vmap_fails_with_a_pointer():
    prob, w_star = _ridge(seed=4)
    hs = torch.zeros(2, 6, dtype=D)
    ws = torch.stack([w_star(h) for h in hs])
    with pytest.raises(TypeError, match="functional_implicit_grad"):
        torch.func.vmap(lambda w, h: hg.implicit_grad(prob.inner_loss, prob.outer_loss, w, h))(
            ws, hs)


@pytest.mark.parametrize("kwargs, match", [
    ({"solver": "gmres"}, "solver"), ({"iterations": 0}, "iterations"),
    ({"alpha": -1.0}, "alpha"), ({"damping": -1.0}, "damping"), ({"tol": -1.0}, "tol"),
])
def test_bad_arguments_are_named(kwargs, match):
    prob, _ = _ridge()
    with pytest.raises(ValueError, match=match):
        hg.functional_implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                                    **kwargs)


# ---- derivatives through the solve (issue 13.1) ----------------------------------------------


def _ridge_with_jacobian(seed: int = 3, n: int = 4):
    """The ridge problem, its closed-form solution w*(h), and d w*/dh by jacrev of the closed
    form (torch.linalg.solve, shares no code with hypergrad)."""
    prob, w_star = _ridge(seed=seed, n=n)
    return prob, w_star, torch.func.jacrev(w_star)(prob.hparams)


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_solution_jacobian_through_a_linear_outer_loss_at_zero(transform):
    """L = u . p has dL/dh = (dw*/dh)^T u; differentiating in u gives the solution Jacobian.
    At u = 0 the solve's right-hand side is 0: the masked CG took no step there and the old
    code returned an exact 0 for this Jacobian."""
    prob, w_star, J = _ridge_with_jacobian()
    h = prob.hparams
    w = w_star(h)

    def g(u):
        return hg.functional_implicit_grad(prob.inner_loss, lambda p, _: u @ p, w, h,
                                           iterations=20, tol=1e-14)

    jac = getattr(torch.func, transform)(g)(torch.zeros(4, dtype=D))
    assert float(J.norm()) > 0.1
    assert testing.compare(jac, J.T).rel_error < 1e-10


def test_second_derivatives_through_the_solve():
    """jacrev of jacrev and jacfwd of jacrev (= torch.func.hessian) of the hypergradient are the
    third derivatives of the value function; the reference is reverse-mode only through the
    closed form (torch's forward mode through linalg.solve is itself off at this order)."""
    prob, w_star = _ridge(seed=3, n=3)

    def value(h):
        return prob.outer_loss(w_star(h), h)

    def hypergrad(h):
        return hg.functional_implicit_grad(prob.inner_loss, prob.outer_loss, w_star(h), h,
                                           iterations=20, tol=1e-14)

    h = prob.hparams
    ref = torch.func.jacrev(torch.func.jacrev(torch.func.grad(value)))(h)
    rr = torch.func.jacrev(torch.func.jacrev(hypergrad))(h)
    assert testing.compare(rr, ref).rel_error < 1e-10
    # the solve's own second derivatives, mixed mode: differentiate the solution twice
    sol = lambda h: hg.functional_implicit_grad(  # noqa: E731
        prob.inner_loss, lambda p, _: p.sum(), w_star(h), h, iterations=20, tol=1e-14)
    ref2 = torch.func.jacrev(torch.func.jacrev(
        lambda h: torch.func.jacrev(w_star)(h).sum(0)))(h)
    assert testing.compare(torch.func.jacfwd(torch.func.jacrev(sol))(h), ref2).rel_error < 1e-10


def test_nested_forward_mode_through_cg_raises_instead_of_a_wrong_answer():
    prob, w_star = _ridge(seed=3, n=3)

    def hypergrad(h):
        return hg.functional_implicit_grad(prob.inner_loss, prob.outer_loss, w_star(h), h)

    with pytest.raises(NotImplementedError, match="pytorch#197867.*jacrev"):
        torch.func.jacfwd(torch.func.jacfwd(hypergrad))(prob.hparams)


def test_derivative_with_respect_to_data_the_inner_loss_closes_over():
    """An autograd.Function cannot see tensors a closure captures; the correction term carries
    dH from them. Reference: the closed form differentiated in the data scale s."""
    prob, _ = _ridge(seed=5, n=4)
    X, y, h = prob.extras["X"], prob.extras["y"], prob.hparams

    def w_star(s, h):
        Xs = X * s
        return torch.linalg.solve(Xs.T @ Xs / len(X) + torch.diag(h.exp()), Xs.T @ y / len(X))

    def reference(s):
        return torch.func.grad(lambda h: prob.outer_loss(w_star(s, h), h))(h).sum()

    def ours(s):
        Xs = X * s

        def inner(w, h):
            return ((Xs @ w - y) ** 2).sum() / (2 * len(y)) + 0.5 * (h.exp() * w**2).sum()

        return hg.functional_implicit_grad(inner, prob.outer_loss, w_star(s, h), h,
                                           iterations=20, tol=1e-14).sum()

    s = torch.tensor(1.3, dtype=D)
    expected = torch.func.grad(reference)(s)
    torch.testing.assert_close(torch.func.grad(ours)(s), expected, rtol=1e-10, atol=0)
    s = s.clone().requires_grad_(True)  # plain autograd too
    ours(s).backward()
    torch.testing.assert_close(s.grad, expected, rtol=1e-10, atol=0)


def test_vmap_of_jacrev_through_the_solve():
    prob, w_star = _ridge(seed=6, n=3)

    def value(h):
        return prob.outer_loss(w_star(h), h)

    def hypergrad(h):
        return hg.functional_implicit_grad(prob.inner_loss, prob.outer_loss, w_star(h), h,
                                           iterations=20, tol=1e-14)

    hs = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=D) - 1.0
    batched = torch.func.vmap(torch.func.jacrev(hypergrad))(hs)
    loop = torch.stack([torch.func.jacrev(torch.func.grad(value))(h) for h in hs])
    assert testing.compare(batched, loop).rel_error < 1e-10


# ---- input checks (issue 13.7) ---------------------------------------------------------------


@pytest.mark.parametrize("which, match", [
    ("params", "`params` leaf 0.*NaN/inf"), ("hparams", "`hparams` leaf 0.*NaN/inf"),
])
def test_non_finite_inputs_are_named_outside_transforms(which, match):
    prob, _ = _ridge()
    args = {"params": prob.params.clone(), "hparams": prob.hparams.clone()}
    args[which][1] = float("nan")
    with pytest.raises(ValueError, match=match):
        hg.functional_implicit_grad(prob.inner_loss, prob.outer_loss, args["params"],
                                    args["hparams"])


def test_non_finite_losses_and_outputs_are_named():
    prob, _ = _ridge()
    nan_inner = lambda p, h: prob.inner_loss(p, h) * float("nan")  # noqa: E731
    with pytest.raises(ValueError, match="`inner_loss`.*NaN/inf"):
        hg.functional_implicit_grad(nan_inner, prob.outer_loss, prob.params, prob.hparams)
    sqrt_outer = lambda p, h: (p - p.detach()).abs().sqrt().sum()  # noqa: E731  d sqrt(0) = inf
    with pytest.raises(ValueError, match="gradient of `outer_loss`.*`params`"):
        hg.functional_implicit_grad(prob.inner_loss, sqrt_outer, prob.params, prob.hparams)
    with pytest.warns(hg.HypergradientWarning, match="NaN/inf.*damping"):
        out = hg.functional_implicit_grad(prob.inner_loss, prob.outer_loss, prob.params,
                                          prob.hparams, solver="neumann", alpha=1e6,
                                          iterations=200)
    assert not torch.isfinite(out).all()


def test_structure_and_dtype_checks_hold_under_vmap_but_values_are_not_read():
    prob, w_star = _ridge(seed=2)
    hs = torch.zeros(2, 6, dtype=D)
    ws = torch.stack([w_star(h) for h in hs])
    with pytest.raises(TypeError, match="`hparams`.*float32"):
        torch.func.vmap(lambda w, h: hg.functional_implicit_grad(
            prob.inner_loss, prob.outer_loss, w, h.float()))(ws, hs)
    with pytest.raises(ValueError, match="`inner_loss`.*scalar"):
        torch.func.vmap(lambda w, h: hg.functional_implicit_grad(
            lambda p, h: p * h, prob.outer_loss, w, h))(ws, hs)
    ws[0, 0] = float("nan")  # under vmap NaN in gives NaN out (values cannot be read)
    out = torch.func.vmap(lambda w, h: hg.functional_implicit_grad(
        prob.inner_loss, prob.outer_loss, w, h))(ws, hs)
    assert not torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("params, hparams, exc, match", [
    ({}, torch.zeros(2, dtype=D), ValueError, "`params`.*non-empty"),
    (torch.zeros(2, dtype=D), {}, ValueError, "`hparams`.*non-empty"),
    (torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=D), TypeError, "`params`.*floating"),
    (torch.zeros(2, dtype=D), torch.zeros(2, dtype=torch.float32), TypeError, "`hparams`.*float32"),
])
def test_empty_int_and_mixed_dtype_inputs_are_named(params, hparams, exc, match):
    with pytest.raises(exc, match=match):
        hg.functional_implicit_grad(lambda p, h: (p * h).sum(), lambda p, h: p.sum(),
                                    params, hparams)
