"""hypergrad.testing: its closed forms are right, its references are right, compare() is right.

The closed forms are checked against autograd through ``torch.linalg.solve`` (a route that
shares no code with the formulas), so the other test files can trust them as ground truth.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings

import hypergrad as hg
from hypergrad import testing
from tests import problems


def _autograd_through_solve_quadratic(prob):
    A, B = prob.extras["A"], prob.extras["B"]
    h = prob.hparams["h"].detach().clone().requires_grad_(True)
    # Recover c from the stationarity condition A p* = B h + c at the given hparams.
    c = A @ prob.params["x"] - B @ prob.hparams["h"]
    p = torch.linalg.solve(A, B @ h + c)
    prob.outer_loss({"x": p}, {"h": h}).backward()
    return h.grad


def _autograd_through_solve_ridge(prob):
    X, y = prob.extras["X"], prob.extras["y"]
    h = prob.hparams.detach().clone().requires_grad_(True)
    A = X.T @ X / X.shape[0] + torch.diag(h.exp())
    w = torch.linalg.solve(A, X.T @ y / X.shape[0])
    prob.outer_loss(w, h).backward()
    return h.grad


@given(testing.quadratic_problems())
def test_quadratic_closed_form_matches_autograd_through_solve(prob):
    ref = _autograd_through_solve_quadratic(prob)
    assert testing.compare(prob.hypergrad["h"], ref).rel_error < 1e-9


@given(testing.ridge_problems())
def test_ridge_closed_form_matches_autograd_through_solve(prob):
    ref = _autograd_through_solve_ridge(prob)
    # Ridge hypergradients can be tiny (a well-fit, weakly regularised model); compare with a
    # scale floor so 1e-9 is relative to the size of the terms, not to their cancellation.
    scale = max(float(ref.norm()), 1e-12)
    assert float((prob.hypergrad - ref).norm()) / scale < 1e-9


@pytest.mark.parametrize("name", problems.NAMES)
def test_table_params_are_exact_optima(name):
    prob = problems.problem(name)
    g = torch.func.grad(prob.inner_loss)(prob.params, prob.hparams)
    gnorm = float(hg.tree.norm(g))
    assert gnorm < 1e-10, f"{name}: inner gradient norm {gnorm:.2e} at the table's optimum"
    H = testing.dense_hessian(prob.inner_loss, prob.params, prob.hparams)
    assert float(torch.linalg.eigvalsh(H).min()) > 0, "inner Hessian must be positive definite"


@pytest.mark.parametrize("name", problems.NAMES)
def test_table_hypergrads_match_dense_reference(name):
    prob = problems.problem(name)
    ref = testing.reference_implicit_grad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams
    )
    assert testing.compare(ref, prob.hypergrad).rel_error < 1e-9


def test_table_unused_hparam_has_zero_hypergradient():
    prob = problems.problem("unused_hparam")
    assert torch.equal(prob.hypergrad["unused"], torch.zeros(2))


def test_dense_hessian_and_mixed_of_a_known_function():
    # f(p, h) = h0 * p0^2 * p1 + p1^3 * h1 ; d2f/dp2 = [[2 h0 p1, 2 h0 p0], [2 h0 p0, 6 h1 p1]],
    # d2f/dp dh = [[2 p0 p1, 0], [p0^2, 3 p1^2]]
    p = {"a": torch.tensor([1.5]), "b": torch.tensor([-2.0])}
    h = torch.tensor([0.7, 1.3])

    def f(p, h):
        return (h[0] * p["a"] ** 2 * p["b"] + p["b"] ** 3 * h[1]).sum()

    H = testing.dense_hessian(f, p, h)
    p0, p1, h0, h1 = 1.5, -2.0, 0.7, 1.3
    expected_H = torch.tensor([[2 * h0 * p1, 2 * h0 * p0], [2 * h0 * p0, 6 * h1 * p1]])
    torch.testing.assert_close(H, expected_H, rtol=1e-14, atol=1e-14)
    M = testing.dense_mixed(f, p, h)
    expected_M = torch.tensor([[2 * p0 * p1, 0.0], [p0**2, 3 * p1**2]])
    torch.testing.assert_close(M, expected_M, rtol=1e-14, atol=1e-14)


def test_reference_unroll_grad_of_a_linear_recursion():
    # p_{t+1} = a p_t + h, p_0 = 0: p_T = h (1 - a^T) / (1 - a); L = p_T^2 / 2
    a, T = 0.6, 7

    def step(p, h, t):
        return a * p + h

    h = torch.tensor([0.9])
    g = testing.reference_unroll_grad(step, torch.zeros(1), h, T, lambda p, h: 0.5 * (p**2).sum())
    c = (1 - a**T) / (1 - a)
    torch.testing.assert_close(g, torch.tensor([c * c * 0.9]), rtol=1e-14, atol=0)


# ---- compare / check_hypergradient on handmade vectors ------------------------------------


def test_compare_on_handmade_vectors():
    approx = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    ref = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0])}
    c = testing.compare(approx, ref)
    assert c.cosine == pytest.approx(3 / (math.sqrt(2) * math.sqrt(5)), rel=1e-14)
    assert c.rel_error == pytest.approx(1 / math.sqrt(5), rel=1e-14)
    assert set(c.per_leaf) == {"['a']", "['b']"}
    assert c.per_leaf["['a']"] == pytest.approx((1.0, 0.0), abs=1e-15)
    assert c.per_leaf["['b']"] == pytest.approx((1.0, 0.5), rel=1e-14)
    text = str(c)
    assert "['b']" in text and "rel_error" in text


def test_compare_opposite_and_orthogonal_vectors():
    c = testing.compare(torch.tensor([-2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert c.cosine == pytest.approx(-1.0)
    assert c.rel_error == pytest.approx(3.0)
    c = testing.compare(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert c.cosine == pytest.approx(0.0, abs=1e-15)
    assert c.rel_error == pytest.approx(math.sqrt(2))
    assert list(c.per_leaf) == ["<root>"]


def test_compare_zero_reference_reports_absolute_error():
    c = testing.compare(torch.tensor([3.0, 4.0]), torch.zeros(2))
    assert c.rel_error == pytest.approx(5.0)
    assert c.cosine == 0.0
    both_zero = testing.compare(torch.zeros(2), torch.zeros(2))
    assert both_zero.rel_error == 0.0 and both_zero.cosine == 1.0


def test_compare_mixed_dtypes_and_identical_trees():
    ref = {"w": torch.tensor([1.0, 2.0, 3.0])}
    c = testing.compare({"w": ref["w"].float()}, ref)
    assert c.rel_error < 1e-7 and c.cosine == pytest.approx(1.0)
    same = testing.compare(ref, ref)
    assert same.rel_error == 0.0 and same.cosine == pytest.approx(1.0, rel=1e-15)


def test_compare_rejects_mismatched_structures():
    with pytest.raises(ValueError, match="`reference`.*`approx`"):
        testing.compare({"a": torch.ones(2)}, {"b": torch.ones(2)})
    with pytest.raises(ValueError, match="`reference`.*`approx`"):
        testing.compare({"a": torch.ones(3)}, {"a": torch.ones(2)})


def test_check_hypergradient_default_and_given_approx():
    prob = problems.problem("logistic")
    good = testing.check_hypergradient(
        prob.inner_loss,
        prob.outer_loss,
        prob.params,
        prob.hparams,
        solver=lambda m, b: hg.cg(m, b, tol=1e-12),
    )
    assert good.rel_error < 1e-8 and good.cosine > 1 - 1e-12
    bad = testing.check_hypergradient(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, approx=-prob.hypergrad
    )
    assert bad.cosine == pytest.approx(-1.0) and bad.rel_error == pytest.approx(2.0)


@settings(max_examples=5)
@given(testing.quadratic_problems(max_params=4, max_hparams=2, max_cond=5.0))
def test_strategies_draw_the_documented_shapes(prob):
    assert prob.params["x"].dtype == torch.float64
    assert prob.params["x"].numel() <= 4 and prob.hparams["h"].numel() <= 2
    eig = torch.linalg.eigvalsh(prob.extras["A"])
    assert float(eig.max() / eig.min()) <= 5.0 * (1 + 1e-9)


def test_problem_factories_honour_dtype():
    for make in (testing.quadratic_problem, testing.ridge_problem, testing.logistic_problem):
        prob = make(dtype=torch.float32)
        assert all(x.dtype == torch.float32 for x in hg.tree.leaves(prob.params))
        assert all(x.dtype == torch.float32 for x in hg.tree.leaves(prob.hparams))
