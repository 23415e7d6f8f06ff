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
