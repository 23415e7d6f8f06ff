"""implicit_grad and implicit_solution: the IFT hypergradient, its premise checks, composition."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from hypothesis import given, settings

import hypergrad as hg
from hypergrad import testing
from tests import problems

TIGHT_CG = functools.partial(hg.cg, tol=1e-12, maxiter=1000)


def rel_error(approx, ref) -> float:
    return testing.compare(approx, ref).rel_error


def caught(fn):
    """Run ``fn``; return (result, list of HypergradientWarnings raised), all warnings shown."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [x for x in w if issubclass(x.category, hg.HypergradientWarning)]


# ---- accuracy against closed forms and references --------------------------------------------


@given(testing.quadratic_problems())
def test_cg_ift_matches_closed_form_on_random_quadratics(prob):
    g = hg.implicit_grad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver=TIGHT_CG
    )
    assert rel_error(g, prob.hypergrad) < 1e-8


@given(testing.ridge_problems())
def test_cg_ift_matches_closed_form_on_per_feature_ridge(prob):
    g = hg.implicit_grad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver=TIGHT_CG
    )
    assert rel_error(g, prob.hypergrad) < 1e-8


@settings(max_examples=8)
@given(testing.quadratic_problems(max_params=8, max_cond=10.0))
def test_neumann_auto_ift_matches_closed_form_on_random_quadratics(prob):
    # alpha = 1/lambda_max contracts the error by (1 - 1/cond) per term: 0.9^400 ~ 5e-19
    solver = functools.partial(hg.neumann, iterations=400, alpha="auto", tol=1e-10)
    g, info = hg.implicit_grad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver=solver, return_info=True
    )
    assert bool(info["solve"].converged)
    assert rel_error(g, prob.hypergrad) < 1e-6


# terms needed grow with the condition number (about 4, 6 and 30 here)
@pytest.mark.parametrize(
    ("name", "terms"), [("ridge", 300), ("logistic", 300), ("nested_pytrees", 1000)]
)
def test_neumann_auto_ift_on_table_problems(name, terms):
    prob = problems.problem(name)
    solver = functools.partial(hg.neumann, iterations=terms, alpha="auto", tol=1e-10)
    g = hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver=solver)
    assert rel_error(g, prob.hypergrad) < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cg_ift_on_logistic_regression_matches_dense_reference(seed):
    prob = testing.logistic_problem(seed=seed, n_features=6)
    ref = testing.reference_implicit_grad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams
    )
    g = hg.implicit_grad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver=TIGHT_CG
    )
    assert rel_error(g, ref) < 1e-6


@pytest.mark.parametrize("name", problems.NAMES)
def test_cg_ift_on_every_table_problem(name):
    prob = problems.problem(name)
    g, info = hg.implicit_grad(
        prob.inner_loss,
        prob.outer_loss,
        prob.params,
        prob.hparams,
        solver=TIGHT_CG,
        return_info=True,
    )
    assert hg.tree.flatten(g)[1] == hg.tree.flatten(prob.hparams)[1]
    assert rel_error(g, prob.hypergrad) < 1e-8
    assert info["trusted"], info["reasons"]


def test_hparams_unused_by_inner_loss_get_exact_zero_not_an_error():
    prob = problems.problem("unused_hparam")
    (g, info), ws = caught(
        lambda: hg.implicit_grad(
            prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, return_info=True
        )
    )
    assert torch.equal(g["unused"], torch.zeros(2)) and not ws and info["trusted"]


def test_outer_loss_that_depends_on_hparams_only():
    prob = problems.problem("quadratic")

    def outer(p, h):  # no dependence on params: the hypergradient is the direct term alone
        return (torch.cos(h["h"]) * h["h"]).sum()

    g = hg.implicit_grad(prob.inner_loss, outer, prob.params, prob.hparams)
    h = prob.hparams["h"]
    torch.testing.assert_close(g["h"], torch.cos(h) - h * torch.sin(h), rtol=1e-14, atol=0)


def test_outer_loss_that_depends_on_nothing_differentiable_gives_zero():
    prob = problems.problem("ridge")
    g = hg.implicit_grad(prob.inner_loss, lambda p, h: torch.tensor(1.0), prob.params, prob.hparams)
    assert torch.equal(g, torch.zeros_like(prob.hparams))


def test_hparam_used_only_by_outer_loss():
    prob = problems.problem("ridge")
    hparams = {"reg": prob.hparams, "scale": torch.tensor(2.0)}

    def outer(w, h):
        return h["scale"] ** 2 * prob.outer_loss(w, h["reg"])

    g = hg.implicit_grad(lambda w, h: prob.inner_loss(w, h["reg"]), outer, prob.params, hparams)
    torch.testing.assert_close(g["scale"], 2 * 2.0 * prob.outer_loss(prob.params, prob.hparams))
    torch.testing.assert_close(g["reg"], 4.0 * prob.hypergrad, rtol=1e-8, atol=0)


def test_custom_solver_protocol_and_return_info():
    prob = problems.problem("quadratic")
    A = prob.extras["A"]
    seen = {}

    def direct_solver(matvec, b):
        seen["b"] = b
        x = {"x": torch.linalg.solve(A, b["x"])}
        r = hg.tree.norm(hg.tree.sub(b, matvec(x))) / hg.tree.norm(b)
        return hg.SolveResult(x, torch.tensor(1), r, r < 1e-10)

    g, info = hg.implicit_grad(
        prob.inner_loss,
        prob.outer_loss,
        prob.params,
        prob.hparams,
        solver=direct_solver,
        return_info=True,
    )
    assert rel_error(g, prob.hypergrad) < 1e-12
    # the solver is handed dL/dparams as its right-hand side
    torch.testing.assert_close(seen["b"]["x"], prob.params["x"] - _outer_target(prob))
    assert info["solve"].solution["x"].shape == prob.params["x"].shape


def _outer_target(prob):
    # outer = 0.5 ||p - t||^2 + ...: recover t from dL/dp at p=0
    zero = {"x": torch.zeros_like(prob.params["x"])}
    return -torch.func.grad(prob.outer_loss)(zero, prob.hparams)["x"]


def test_implicit_grad_is_pure():
    prob = problems.problem("logistic")
    w = prob.params.clone().requires_grad_(True)
    h = prob.hparams.clone().requires_grad_(True)
    g = hg.implicit_grad(prob.inner_loss, prob.outer_loss, w, h)
    assert w.grad is None and h.grad is None and not g.requires_grad
    assert torch.equal(w.detach(), prob.params)


# ---- diagnostics -----------------------------------------------------------------------------


def test_return_info_reports_the_premise_at_an_optimum():
    prob = problems.problem("logistic")
    g, info = hg.implicit_grad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, return_info=True
    )
    assert {"solve", "inner_grad_norm", "stationarity", "nonpositive_curvature", "trusted"} <= set(
        info
    )
    assert isinstance(info["solve"], hg.SolveResult) and bool(info["solve"].converged)
    assert float(info["stationarity"]) < 1e-10 and float(info["inner_grad_norm"]) < 1e-12
    assert info["nonpositive_curvature"] is False and info["trusted"] is True
    assert info["reasons"] == []


def test_stationarity_is_the_relative_residual_of_the_optimality_condition():
    # quadratic f = 0.5 p^T A p - p^T c: stationarity = ||A p - c|| / max(||A p||, ||c||)
    prob = problems.problem("quadratic")
    A, B = prob.extras["A"], prob.extras["B"]
    c = A @ prob.params["x"] - B @ prob.hparams["h"] + B @ prob.hparams["h"]
    p = {"x": prob.params["x"] + 0.1}
    _, info = hg.implicit_grad(
        prob.inner_loss, prob.outer_loss, p, prob.hparams, return_info=True, on_failure="ignore"
    )
    Ap = A @ p["x"]
    expected = (Ap - c).norm() / torch.maximum(Ap.norm(), c.norm())
    torch.testing.assert_close(info["stationarity"], expected, rtol=1e-10, atol=0)


def _perturbed_logistic():
    prob = problems.problem("logistic")
    return prob, prob.params + 0.5  # far from the optimum, Hessian still positive definite


def test_non_stationary_params_warn_exactly_once():
    prob, bad = _perturbed_logistic()
    (g, info), ws = caught(
        lambda: hg.implicit_grad(
            prob.inner_loss, prob.outer_loss, bad, prob.hparams, return_info=True
        )
    )
    assert len(ws) == 1, [str(w.message) for w in ws]
    assert "stationary" in str(ws[0].message)
    assert info["trusted"] is False and float(info["stationarity"]) > 1e-3
    assert bool(info["solve"].converged) and info["nonpositive_curvature"] is False
    assert hg.tree.all_finite(g)  # still computed: the caller decides


def test_default_filter_shows_a_repeated_failure_once_per_call_site():
    prob, bad = _perturbed_logistic()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("default")
        for _ in range(3):  # e.g. a training loop hitting the same problem every step
            hg.implicit_grad(prob.inner_loss, prob.outer_loss, bad, prob.hparams)
    assert [issubclass(x.category, hg.HypergradientWarning) for x in w] == [True]
    assert w[0].filename == __file__  # attributed to the caller, not to hypergrad


def test_each_failed_premise_warns_once():
    prob, bad = _perturbed_logistic()
    one_step = functools.partial(hg.cg, maxiter=1, tol=1e-12)
    _, ws = caught(
        lambda: hg.implicit_grad(
            prob.inner_loss, prob.outer_loss, bad, prob.hparams, solver=one_step
        )
    )
    messages = sorted(str(w.message) for w in ws)
    assert len(messages) == 2
    assert sum("did not converge" in m for m in messages) == 1
    assert sum("stationary" in m for m in messages) == 1
    # only the solve failing, at the optimum
    _, ws = caught(
        lambda: hg.implicit_grad(
            prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver=one_step
        )
    )
    assert [("did not converge" in str(w.message)) for w in ws] == [True]


def test_nonpositive_curvature_at_a_saddle_is_reported():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    A = (q * torch.tensor([-1.0, 1.0, 2.0, 3.0, 4.0])) @ q.T
    B = torch.randn(5, 2, generator=g)
    h = torch.randn(2, generator=g)

    def inner(p, h):
        return 0.5 * p @ A @ p - p @ (B @ h)

    p_saddle = torch.linalg.solve(A, B @ h)  # stationary, but not a minimum
    (_, info), ws = caught(
        lambda: hg.implicit_grad(
            inner, lambda p, h: (p**2).sum(), p_saddle, h, solver=TIGHT_CG, return_info=True
        )
    )
    assert info["nonpositive_curvature"] is True and info["trusted"] is False
    assert float(info["stationarity"]) < 1e-12
    curvature = [w for w in ws if "non-positive curvature" in str(w.message)]
    assert len(curvature) == 1
    assert not any("stationary" in str(w.message) for w in ws)
    with pytest.raises(hg.HypergradientError, match="non-positive curvature"):
        hg.implicit_grad(inner, lambda p, h: (p**2).sum(), p_saddle, h, on_failure="raise")


def test_on_failure_raise_and_ignore():
    prob, bad = _perturbed_logistic()
    with pytest.raises(hg.HypergradientError, match="not a stationary point"):
        hg.implicit_grad(prob.inner_loss, prob.outer_loss, bad, prob.hparams, on_failure="raise")
    (g, info), ws = caught(
        lambda: hg.implicit_grad(
            prob.inner_loss,
            prob.outer_loss,
            bad,
            prob.hparams,
            on_failure="ignore",
            return_info=True,
        )
    )
    assert ws == [] and info["trusted"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing at all may be emitted at a good optimum
        hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams)


def test_stationarity_check_can_be_switched_off():
    prob, bad = _perturbed_logistic()
    (_, info), ws = caught(
        lambda: hg.implicit_grad(
            prob.inner_loss,
            prob.outer_loss,
            bad,
            prob.hparams,
            stationarity_tol=None,
            return_info=True,
        )
    )
    assert ws == [] and "stationarity" not in info and info["trusted"] is True
    # a loose threshold accepts it, a tight one does not
    _, ws = caught(
        lambda: hg.implicit_grad(
            prob.inner_loss, prob.outer_loss, bad, prob.hparams, stationarity_tol=10.0
        )
    )
    assert ws == []


# ---- implicit_solution -----------------------------------------------------------------------


def test_implicit_solution_forward_is_params_and_backward_is_the_ift():
    prob = problems.problem("nested_pytrees")
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    info: dict = {}
    p_star = hg.implicit_solution(prob.inner_loss, prob.params, h, solver=TIGHT_CG, info=info)
    assert hg.tree.flatten(p_star)[1] == hg.tree.flatten(prob.params)[1]
    for a, b in zip(hg.tree.leaves(p_star), hg.tree.leaves(prob.params)):
        assert torch.equal(a, b) and a.requires_grad
    assert info == {}  # diagnostics arrive with the backward
    prob.outer_loss(p_star, h).backward()
    grads = [x.grad for x in hg.tree.leaves(h)]
    assert rel_error(hg.tree.unflatten(grads, hg.tree.flatten(h)[1]), prob.hypergrad) < 1e-8
    assert info["trusted"] is True and float(info["stationarity"]) < 1e-10
    assert bool(info["solve"].converged) and info["nonpositive_curvature"] is False


def test_implicit_solution_does_not_touch_params_grad_and_chains_through_hparams():
    prob = problems.problem("ridge")
    w = prob.params.clone().requires_grad_(True)
    raw = (prob.hparams / 2).clone().requires_grad_(True)
    h = 2 * raw  # hparams computed from a meta-parameter: the chain rule must apply
    w_star = hg.implicit_solution(prob.inner_loss, w, h, solver=TIGHT_CG)
    prob.outer_loss(w_star, h).backward()
    assert w.grad is None
    torch.testing.assert_close(raw.grad, 2 * prob.hypergrad, rtol=1e-8, atol=0)


def test_implicit_solution_with_direct_hparam_dependence_and_unused_hparam():
    prob = problems.problem("unused_hparam")
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    w_star = hg.implicit_solution(prob.inner_loss, prob.params, h, solver=TIGHT_CG)
    loss = prob.outer_loss(w_star, h) + (h["unused"] ** 2).sum() + h["used"].sum()
    loss.backward()
    torch.testing.assert_close(h["unused"].grad, 2 * prob.hparams["unused"])
    torch.testing.assert_close(h["used"].grad, prob.hypergrad["used"] + 1.0, rtol=1e-8, atol=1e-12)


def _composed_reference(pt_loss, ft_loss, outer, p_star, h, K, lr):
    """By hand: p_K = Phi(p*(h), h) with Phi = K gradient steps on ft_loss, L(p_K, h).

    dL/dh = dL/dh|direct + J_h^T g + (dp*/dh)^T J_p^T g,   dp*/dh = -H^{-1} M,
    with g = dL/dp_K, J_p = dPhi/dp, J_h = dPhi/dh (dense, torch.func.jacrev), H and M the
    dense Hessian and mixed derivative of the pre-training loss.
    """

    def phi(p, h):
        for _ in range(K):
            p = p - lr * torch.func.grad(ft_loss)(p, h)
        return p

    p_K = phi(p_star, h)
    g_p, g_h = torch.func.grad(outer, argnums=(0, 1))(p_K, h)
    J_p, J_h = torch.func.jacrev(phi, argnums=(0, 1))(p_star, h)
    H = testing.dense_hessian(pt_loss, p_star, h)
    M = testing.dense_mixed(pt_loss, p_star, h)
    dp_dh = -torch.linalg.solve(H, M)
    return g_h + J_h.T @ g_p + dp_dh.T @ (J_p.T @ g_p)


@pytest.mark.parametrize("K", [0, 1, 3])
def test_implicit_solution_then_k_steps_matches_the_hand_formula(K):
    prob = testing.logistic_problem(seed=7, n_features=5)
    gen = torch.Generator().manual_seed(8)
    Xf, yf = torch.randn(20, 5, generator=gen), torch.randn(20, generator=gen)

    def ft_loss(w, h):  # fine-tuning loss that itself depends on the hyperparameters
        return ((Xf @ w - yf) ** 2).mean() / 2 + 0.1 * (torch.tanh(h) * w).sum()

    def outer(w, h):
        return prob.outer_loss(w, h) + 0.01 * (h**2).sum()

    lr = 0.1
    expected = _composed_reference(
        prob.inner_loss, ft_loss, outer, prob.params, prob.hparams, K, lr
    )
    h = prob.hparams.clone().requires_grad_(True)
    info: dict = {}
    w = hg.implicit_solution(prob.inner_loss, prob.params, h, solver=TIGHT_CG, info=info)
    w_K = hg.unroll(hg.gradient_step(ft_loss, lr=lr), w, h, steps=K)
    outer(w_K, h).backward()
    assert rel_error(h.grad, expected) < 1e-8
    assert info["trusted"]


def test_implicit_solution_warns_or_raises_on_backward():
    prob, bad = _perturbed_logistic()
    h = prob.hparams.clone().requires_grad_(True)
    w = hg.implicit_solution(prob.inner_loss, bad, h)  # nothing is checked in the forward
    _, ws = caught(lambda: prob.outer_loss(w, h).backward())
    assert len(ws) == 1 and "stationary" in str(ws[0].message)
    h.grad = None
    w = hg.implicit_solution(prob.inner_loss, bad, h, on_failure="raise")
    with pytest.raises(hg.HypergradientError, match="stationary"):
        prob.outer_loss(w, h).backward()
    info: dict = {"stale": 1}
    w = hg.implicit_solution(prob.inner_loss, bad, h, on_failure="ignore", info=info)
    _, ws = caught(lambda: prob.outer_loss(w, h).backward())
    assert ws == [] and info["trusted"] is False and "stale" not in info


def test_implicit_solution_accepts_a_neumann_solver():
    prob = problems.problem("ridge")
    h = prob.hparams.clone().requires_grad_(True)
    solver = functools.partial(hg.neumann, iterations=3000, alpha="auto", tol=1e-10)
    prob.outer_loss(
        hg.implicit_solution(prob.inner_loss, prob.params, h, solver=solver), h
    ).backward()
    assert rel_error(h.grad, prob.hypergrad) < 1e-6


# ---- float32 smoke ---------------------------------------------------------------------------


def test_float32_smoke():
    prob = testing.quadratic_problem(seed=0, dtype=torch.float32)
    ref = hg.tree.map(torch.Tensor.double, prob.hypergrad)  # its closed form, in float32
    solver = functools.partial(hg.cg, tol=1e-5)
    g, info = hg.implicit_grad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver=solver, return_info=True
    )
    assert g["h"].dtype == torch.float32 and info["trusted"]
    assert rel_error(g, ref) < 1e-3
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    p = hg.implicit_solution(prob.inner_loss, prob.params, h, solver=solver)
    prob.outer_loss(p, h).backward()
    assert h["h"].grad.dtype == torch.float32
    torch.testing.assert_close(h["h"].grad, g["h"], rtol=1e-5, atol=1e-6)


# ---- float64 end to end ----------------------------------------------------------------------


def test_float64_end_to_end_even_when_the_default_dtype_is_float32(float32):
    """With float32 as torch's default, float64 inputs must stay float64 everywhere (no tensor
    created internally in the default dtype) and reach float64 accuracy."""
    assert torch.get_default_dtype() == torch.float32
    prob = testing.quadratic_problem(seed=11, n_params=7, n_hparams=3, dtype=torch.float64)
    for solver in (TIGHT_CG, functools.partial(hg.neumann, iterations=400, alpha="auto")):
        g, info = hg.implicit_grad(
            prob.inner_loss,
            prob.outer_loss,
            prob.params,
            prob.hparams,
            solver=solver,
            return_info=True,
        )
        assert g["h"].dtype == torch.float64
        res = info["solve"]
        assert res.solution["x"].dtype == torch.float64
        assert res.residual_norm.dtype == torch.float64
        assert info["stationarity"].dtype == torch.float64
        assert rel_error(g, prob.hypergrad) < 1e-8
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    p = hg.implicit_solution(prob.inner_loss, prob.params, h, solver=TIGHT_CG)
    lr = 1.0 / float(torch.linalg.eigvalsh(prob.extras["A"]).max())
    p = hg.unroll(hg.gradient_step(prob.inner_loss, lr=lr), p, h, 3, checkpoint_every=2)
    assert p["x"].dtype == torch.float64
    prob.outer_loss(p, h).backward()
    assert h["h"].grad.dtype == torch.float64
    # at the optimum, gradient steps do not move: the composed gradient is the IFT's
    assert rel_error({"h": h["h"].grad}, prob.hypergrad) < 1e-8


# ---- NaN/inf named where it appears (issue 13.4) ---------------------------------------------


def test_a_nan_inner_loss_is_named_instead_of_three_misleading_warnings():
    prob = problems.problem("ridge")

    def inner(w, h):  # NaN value, NaN gradient: it used to give zeros and blame the solver
        return prob.inner_loss(w, h) + torch.log(-h.sum().abs() - 1.0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="value of `inner_loss` at `params` is NaN/inf"):
            hg.implicit_grad(inner, prob.outer_loss, prob.params, prob.hparams)
        h = prob.hparams.clone().requires_grad_(True)
        w = hg.implicit_solution(inner, prob.params, h)
        with pytest.raises(ValueError, match="value of `inner_loss` at `params` is NaN/inf"):
            prob.outer_loss(w, h).backward()


def test_a_non_finite_inner_gradient_is_named_with_its_leaf():
    prob = problems.problem("nested_pytrees")

    def inner(p, h):  # finite value, infinite gradient in leaf "b"[0] (sqrt at 0)
        return prob.inner_loss(p, h) + (p["b"][0] - p["b"][0].detach()).abs().sqrt().sum()

    with pytest.raises(ValueError, match=r"gradient of `inner_loss` .* `params` leaf 1 "
                                         r"\(shape \(3,\)\) is NaN/inf"):
        hg.implicit_grad(inner, prob.outer_loss, prob.params, prob.hparams)


def test_a_solve_that_returns_nan_warns_and_flags_the_result():
    prob = problems.problem("quadratic")

    def broken(matvec, b):
        x = hg.tree.map(lambda t: torch.full_like(t, float("nan")), b)
        return hg.SolveResult(x, torch.tensor(1), torch.tensor(float("nan")), torch.tensor(False))

    (g, info), ws = caught(lambda: hg.implicit_grad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver=broken,
        return_info=True))
    assert [("returned NaN/inf" in str(w.message)) for w in ws] == [True]
    assert info["trusted"] is False and not hg.tree.all_finite(g)
    with pytest.raises(hg.HypergradientError, match="returned NaN/inf"):
        hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                         solver=broken, on_failure="raise")


def test_info_health_holds_the_one_read_as_python_numbers():
    prob = problems.problem("logistic")
    _, info = hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                               solver=TIGHT_CG, return_info=True)
    health = info["health"]
    assert {"residual_norm", "iterations", "converged", "inner_grad_norm", "stationarity",
            "nonpositive_curvature", "min_rayleigh", "max_rayleigh"} <= set(health)
    assert all(isinstance(v, float) for v in health.values())
    assert health["residual_norm"] == float(info["solve"].residual_norm)
    assert health["iterations"] == int(info["solve"].iterations)
    assert health["stationarity"] == float(info["stationarity"])


# ---- advice that fixes the problem (issue 13.6) ----------------------------------------------


def _overparameterised_least_squares():
    """5 samples, 10 features: H = X^T X / n is PSD of rank 5. The hparam scales the targets,
    and the outer gradient has a component in H's null space, so H w = dL/dp has no solution."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 10, generator=g), torch.randn(5, generator=g)
    Xv, yv = torch.randn(8, 10, generator=g), torch.randn(8, generator=g)

    def inner(w, h):
        return ((X @ w - y * h.sum()) ** 2).mean() / 2

    def outer(w, h):
        return ((Xv @ w - yv) ** 2).mean() / 2

    w = torch.linalg.pinv(X) @ y  # a minimiser at h = 1
    return inner, outer, w, torch.ones(1)


def _suggested_damping(message: str) -> float:
    import re

    return float(re.search(r"damping=([0-9.e+-]+)\)?:", message).group(1))


def test_a_singular_hessian_gets_damping_advice_that_fixes_it():
    inner, outer, w, h = _overparameterised_least_squares()
    (g, info), ws = caught(lambda: hg.implicit_grad(inner, outer, w, h, return_info=True))
    assert len(ws) == 1, [str(x.message) for x in ws]
    message = str(ws[0].message)
    assert "more iterations will not help" in message and "singular" in message
    assert "increase the solver's iterations" not in message
    assert "not at a strict minimum" not in message  # zero curvature is not a saddle
    assert info["trusted"] is False and info["singular"] is True
    damping = _suggested_damping(message)  # 1e-3 x the largest curvature CG measured
    assert damping == pytest.approx(1e-3 * info["health"]["max_rayleigh"], rel=0.5)
    H = testing.dense_hessian(inner, w, h)  # (which is at most lambda_max)
    assert 0 < damping <= 1e-3 * float(torch.linalg.eigvalsh(H).max())
    # the advice works: the damped solve converges and is the damped IFT, computed densely
    solver = functools.partial(hg.cg, damping=damping, tol=1e-12, maxiter=200)
    (g, info), ws = caught(lambda: hg.implicit_grad(inner, outer, w, h, solver=solver,
                                                    return_info=True))
    assert ws == [] and info["trusted"]
    M = testing.dense_mixed(inner, w, h)
    gp = torch.func.grad(outer)(w, h)
    expected = -M.T @ torch.linalg.solve(H + damping * torch.eye(10), gp)
    assert rel_error(g, expected) < 1e-8


def test_an_ill_conditioned_hessian_gets_damping_advice_not_more_iterations():
    """cond(H) = 1e8 in float64: CG's residual ends above 1 after 100 or 1000 products (it
    stagnates); with cond 1e4 and too few iterations the advice is more iterations."""
    prob = testing.quadratic_problem(seed=0, n_params=100, n_hparams=3, cond=1e8)
    for maxiter in (100, 1000):
        solver = functools.partial(hg.cg, maxiter=maxiter)
        _, ws = caught(lambda s=solver: hg.implicit_grad(
            prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver=s))
        assert len(ws) == 1
        assert "more iterations will not help" in str(ws[0].message)
        assert _suggested_damping(str(ws[0].message)) > 0
    prob = testing.quadratic_problem(seed=0, n_params=100, n_hparams=3, cond=1e4)
    _, ws = caught(lambda: hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params,
                                            prob.hparams, solver=functools.partial(hg.cg,
                                                                                   maxiter=100)))
    assert len(ws) == 1 and "increase the solver's iterations" in str(ws[0].message).lower()
    assert "will not help" not in str(ws[0].message)
    (g, info), ws = caught(lambda: hg.implicit_grad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
        solver=functools.partial(hg.cg, maxiter=1000, tol=1e-10), return_info=True))
    assert ws == [] and rel_error(g, prob.hypergrad) < 1e-6  # and that advice works


def test_a_diverging_neumann_series_is_told_to_lower_alpha():
    prob = problems.problem("quadratic")
    lam = float(torch.linalg.eigvalsh(prob.extras["A"]).max())
    solver = functools.partial(hg.neumann, iterations=30, alpha=3.0 / lam)
    _, ws = caught(lambda: hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params,
                                            prob.hparams, solver=solver))
    assert len(ws) == 1 and "alpha" in str(ws[0].message)
    assert "alpha='auto'" in str(ws[0].message)


# ---- tensors captured by the inner loss (issue 14.7) -----------------------------------------


def test_a_captured_parameter_warns_once_naming_its_shape():
    prob = problems.problem("ridge")
    layer = torch.nn.Linear(8, 1).double()  # its weight and bias require grad

    def inner(w, h):  # uses the module's own parameters through the closure
        return prob.inner_loss(w, h) + 1e-3 * (layer(w[None]) ** 2).sum()

    def probe(fn):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fn()
        return [str(x.message) for x in w if issubclass(x.category, hg.HypergradientWarning)
                and "neither `params` nor `hparams`" in str(x.message)]

    msgs = probe(lambda: hg.implicit_grad(inner, prob.outer_loss, prob.params, prob.hparams,
                                          on_failure="ignore"))
    assert len(msgs) == 1 and "2 tensor(s)" in msgs[0]
    assert "(1, 8)" in msgs[0] and "(1,)" in msgs[0]
    h = prob.hparams.clone().requires_grad_(True)
    w = hg.implicit_solution(inner, prob.params, h, on_failure="ignore")
    assert len(probe(lambda: prob.outer_loss(w, h).backward())) == 1
    # nothing captured: silent; parameters with requires_grad=False: silent
    assert probe(lambda: hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params,
                                          prob.hparams)) == []
    layer.requires_grad_(False)
    assert probe(lambda: hg.implicit_grad(inner, prob.outer_loss, prob.params, prob.hparams,
                                          on_failure="ignore")) == []


# ---- no double backward (issue 16.2) ---------------------------------------------------------


def test_a_model_without_double_backward_gets_hypergrads_own_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 8, generator=gen, dtype=torch.float32)

    def inner(p, h):  # the default CPU kernel of SDPA has no double backward
        q = x @ p["w"]
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return (out ** 2).mean() + (h * p["w"] ** 2).sum()

    p = {"w": torch.randn(8, 8, generator=gen, dtype=torch.float32)}
    h = torch.tensor(0.1, dtype=torch.float32)
    with pytest.raises(hg.DoubleBackwardError, match='products="finite_difference"') as e:
        hg.implicit_grad(inner, lambda p, h: p["w"].sum(), p, h, stationarity_tol=None)
    assert "derivative for" in str(e.value.__cause__)  # chained from torch's error
    with pytest.raises(hg.DoubleBackwardError, match="finite_difference"):
        hg.hvp(lambda p: inner(p, h), p, hg.tree.map(torch.ones_like, p))


# ---- products="finite_difference" (issue 16.1/16.2) ------------------------------------------


def _attention_problem(dtype=torch.float64):
    """A one-head attention block whose default CPU SDPA kernel has no double backward; the
    inner loss is a ridge-regularised fit of its output, params at a stationary point found
    by Newton's method through the MATH kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 5, 4, generator=gen, dtype=dtype)  # (batch, heads, tokens, dim)
    y = torch.randn(2, 1, 5, 4, generator=gen, dtype=dtype)

    def inner(p, h):
        q = x @ p["w"]
        out = torch.nn.functional.scaled_dot_product_attention(q, x, x)
        return ((out - y) ** 2).mean() + 0.5 * (h.exp() * p["w"] ** 2).sum()

    def outer(p, h):
        q = x @ p["w"]
        return torch.nn.functional.scaled_dot_product_attention(q, x, y).square().mean()

    h = torch.full((4, 4), -1.0, dtype=dtype)
    w = torch.zeros(16, dtype=dtype)
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(30):
            f = lambda v: inner({"w": v.reshape(4, 4)}, h)  # noqa: E731
            w = w - torch.linalg.solve(torch.func.hessian(f)(w), torch.func.grad(f)(w))
    return inner, outer, {"w": w.reshape(4, 4)}, h


def test_finite_difference_products_give_the_exact_hypergradient_without_double_backward():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    inner, outer, p, h = _attention_problem()
    with pytest.raises(hg.DoubleBackwardError):  # the default kernel: exact products fail
        hg.implicit_grad(inner, outer, p, h, solver=TIGHT_CG)
    with sdpa_kernel(SDPBackend.MATH):  # reference: exact products through the MATH kernel
        ref = hg.implicit_grad(inner, outer, p, h, solver=TIGHT_CG)
    (g, info), ws = caught(lambda: hg.implicit_grad(
        inner, outer, p, h, solver=functools.partial(hg.cg, tol=1e-10, maxiter=200),
        products="finite_difference", return_info=True))
    assert ws == [] and info["trusted"], info["reasons"]
    assert rel_error(g, ref) < 1e-6  # O(sqrt(eps)) products in float64
    hq = h.clone().requires_grad_(True)
    w = hg.implicit_solution(inner, p, hq, products="finite_difference",
                             solver=functools.partial(hg.cg, tol=1e-10, maxiter=200))
    outer(w, hq).backward()
    assert rel_error(hq.grad, ref) < 1e-6


def test_finite_difference_products_keep_the_checks():
    prob = problems.problem("ridge")
    kw = {"products": "finite_difference"}
    with pytest.raises(ValueError, match="`products` must be one of"):
        hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                         products="fd")
    with pytest.raises(ValueError, match="does not depend on `params`"):
        hg.implicit_grad(lambda w, h: prob.inner_loss(w.detach(), h), prob.outer_loss,
                         prob.params, prob.hparams, **kw)
    nan_inner = lambda w, h: prob.inner_loss(w, h) * float("nan")  # noqa: E731
    with pytest.raises(ValueError, match="value of `inner_loss` at `params` is NaN/inf"):
        hg.implicit_grad(nan_inner, prob.outer_loss, prob.params, prob.hparams, **kw)
    g = hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                         solver=TIGHT_CG, **kw)
    assert rel_error(g, prob.hypergrad) < 1e-7


# ---- a solve that is an approximation by design (sama, one-term Neumann) ----------------------


@pytest.mark.parametrize("solver", [
    hg.sama,
    functools.partial(hg.sama, alpha=0.1),
    functools.partial(hg.neumann, iterations=1, alpha=0.1),
    functools.partial(hg.neumann, iterations=1),  # alpha="auto": 20 power iterations, no term
], ids=["sama", "sama-alpha", "neumann-1", "neumann-1-auto"])
def test_a_solve_that_spends_nothing_by_design_is_not_told_to_iterate_or_damp(solver):
    """Its residual (1, that of the zero start) is an estimate that says nothing about the
    solution: no "more iterations will not help", no damping, no stagnation; the warning says
    the residual is an estimate and how to measure it."""
    prob = problems.problem("quadratic")
    (_, info), ws = caught(lambda: hg.implicit_grad(
        prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver=solver,
        return_info=True))
    assert len(ws) == 1, [str(x.message) for x in ws]
    message = str(ws[0].message)
    assert "is an estimate" in message and "approximation of H^-1 b by design" in message
    assert "residual=True" in message  # how to measure it (exact_residual=True for neumann)
    for wrong in ("iterations", "damping", "singular", "ill-conditioned", "alpha="):
        assert wrong not in message, wrong
    assert info["stagnated"] is False and info["singular"] is False
    assert info["health"]["residual_estimate"] == 1.0 and info["health"]["terms"] == 1.0
    assert info["trusted"] is False  # not measured, so not vouched for
    _, ws = caught(lambda: hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params,
                                            prob.hparams, solver=solver, on_failure="ignore"))
    assert ws == []


def test_a_measured_or_longer_series_keeps_its_advice():
    """The exception is exactly the one-term estimate: with residual=True the residual is
    measured (here the series diverges: lower alpha); with 3 terms the estimate is of 2 terms
    (not converged: more iterations)."""
    prob = problems.problem("quadratic")
    lam = float(torch.linalg.eigvalsh(prob.extras["A"]).max())
    for solver, advice in ((functools.partial(hg.sama, alpha=3.0 / lam, residual=True), "alpha"),
                           (functools.partial(hg.neumann, iterations=3, alpha=0.5 / lam),
                            "increase the solver's iterations")):
        _, ws = caught(lambda s=solver: hg.implicit_grad(
            prob.inner_loss, prob.outer_loss, prob.params, prob.hparams, solver=s))
        assert len(ws) == 1 and advice in str(ws[0].message)
        assert "by design" not in str(ws[0].message)


# ---- finite-difference products: no extra gradient, no extra host read (item 4) ----------------


def _counted(fn):
    calls = [0]

    def counted(p, h):
        calls[0] += 1
        return fn(p, h)

    return counted, calls


@pytest.mark.parametrize("stationarity_tol", [None, 1e-3])
def test_finite_differences_spend_on_the_inner_loss_only_their_products(stationarity_tol):
    """Each product is two gradients of ``f`` and the health check reads those: SAMA (no
    solve, one mixed product) costs 2 gradients of ``f``, plus 2 for the stationarity product;
    a solver with k matvecs adds 2 k. (Before: a separate forward for the path check and a
    gradient for the health check, 1.4 gradients more.)"""
    prob = problems.problem("ridge")
    inner, calls = _counted(prob.inner_loss)
    extra = 0 if stationarity_tol is None else 2
    hg.implicit_grad(inner, prob.outer_loss, prob.params, prob.hparams, solver=hg.sama,
                     products="finite_difference", on_failure="ignore",
                     stationarity_tol=stationarity_tol)
    assert calls[0] == 2 + extra
    calls[0] = 0
    solver = functools.partial(hg.neumann, iterations=6, alpha=0.1)  # 5 matvecs
    hg.implicit_grad(inner, prob.outer_loss, prob.params, prob.hparams, solver=solver,
                     products="finite_difference", on_failure="ignore",
                     stationarity_tol=stationarity_tol)
    assert calls[0] == 2 * 5 + 2 + extra


def test_finite_difference_health_signals_match_the_exact_ones_away_from_the_optimum():
    """The inner gradient (norm and stationarity) now comes from the mean of a product's two
    gradients, ``g(θ) + O(δ²)``: equal to the exact values to FD accuracy."""
    prob = problems.problem("logistic")
    params = hg.tree.map(lambda x: x + 0.05, prob.params)  # not stationary
    kw = {"solver": functools.partial(hg.cg, maxiter=50), "on_failure": "ignore",
          "return_info": True}
    _, exact = hg.implicit_grad(prob.inner_loss, prob.outer_loss, params, prob.hparams, **kw)
    _, fd = hg.implicit_grad(prob.inner_loss, prob.outer_loss, params, prob.hparams,
                             products="finite_difference", **kw)
    assert float(exact["inner_grad_norm"]) > 1e-3
    for key in ("inner_grad_norm", "stationarity"):
        assert float(fd[key]) == pytest.approx(float(exact[key]), rel=1e-6), key
    assert fd["reasons"][-1] == exact["reasons"][-1]  # the same stationarity warning
    # without a product along params (sama, stationarity_tol=None) there is no estimate
    _, none = hg.implicit_grad(prob.inner_loss, prob.outer_loss, params, prob.hparams,
                               solver=hg.sama, products="finite_difference",
                               stationarity_tol=None, on_failure="ignore", return_info=True)
    assert none["inner_grad_norm"] is None and "inner_grad_norm" not in none["health"]


def test_finite_differences_without_a_matvec_keep_the_path_and_capture_checks():
    """SAMA spends no matvec: the one walk of the graph happens in the mixed product."""
    prob = problems.problem("ridge")
    kw = {"solver": hg.sama, "products": "finite_difference", "on_failure": "ignore"}
    with pytest.raises(ValueError, match="does not depend on `params`"):
        hg.implicit_grad(lambda w, h: prob.inner_loss(w.detach(), h), prob.outer_loss,
                         prob.params, prob.hparams, **kw)
    scale = torch.ones((), requires_grad=True)
    _, ws = caught(lambda: hg.implicit_grad(lambda w, h: scale * prob.inner_loss(w, h),
                                            prob.outer_loss, prob.params, prob.hparams, **kw))
    assert len(ws) == 1 and "uses 1 tensor(s)" in str(ws[0].message)
    hq = prob.hparams.clone().requires_grad_(True)
    w = hg.implicit_solution(lambda w, h: scale * prob.inner_loss(w, h), prob.params, hq, **kw)
    _, ws = caught(lambda: prob.outer_loss(w, hq).backward())
    assert len(ws) == 1 and "uses 1 tensor(s)" in str(ws[0].message)


# ---- fd_eps: the step of finite-difference products (item 5) -----------------------------------


def test_fd_eps_sets_the_step_of_the_products():
    """On a quartic inner loss the products' truncation error is O(eps^2): halving fd_eps
    quarters the hypergradient's error (rounding is negligible at these steps in float64)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=gen)
    A = A @ A.T / 5 + torch.eye(5)
    t = torch.randn(5, generator=gen)

    def inner(p, h):
        return 0.5 * p @ A @ p + 0.25 * (h * (p - t) ** 4).sum() - p.sum()

    outer = lambda p, h: (p ** 2).sum()  # noqa: E731
    h = torch.rand(5, generator=gen) + 0.5
    p = torch.zeros(5)
    for _ in range(50):  # Newton to the optimum
        p = p - torch.linalg.solve(torch.func.hessian(inner)(p, h), torch.func.grad(inner)(p, h))
    solver = functools.partial(hg.cg, tol=1e-14, maxiter=100)
    ref = hg.implicit_grad(inner, outer, p, h, solver=solver)
    errors = [rel_error(hg.implicit_grad(inner, outer, p, h, solver=solver, on_failure="ignore",
                                         products="finite_difference", fd_eps=eps), ref)
              for eps in (4e-3, 2e-3)]
    assert errors[0] > 1e-7  # the truncation term, well above rounding
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.05)
    default = hg.implicit_grad(inner, outer, p, h, solver=solver, products="finite_difference",
                               on_failure="ignore")
    assert rel_error(default, ref) < 1e-7
    hq = h.clone().requires_grad_(True)
    outer(hg.implicit_solution(inner, p, hq, solver=solver, on_failure="ignore",
                               products="finite_difference", fd_eps=4e-3), hq).backward()
    assert rel_error(hq.grad, ref) == pytest.approx(errors[0], rel=1e-6)


def test_fd_eps_bad_input_names_it():
    prob = problems.problem("ridge")
    args = (prob.inner_loss, prob.outer_loss, prob.params, prob.hparams)
    with pytest.raises(ValueError, match="`fd_eps` must be a finite number > 0"):
        hg.implicit_grad(*args, products="finite_difference", fd_eps=-1e-3)
    with pytest.raises(ValueError, match='`fd_eps` .* products="finite_difference"'):
        hg.implicit_grad(*args, fd_eps=1e-3)
    with pytest.raises(ValueError, match="`fd_eps`"):
        hg.implicit_solution(prob.inner_loss, prob.params,
                             prob.hparams.clone().requires_grad_(True), fd_eps=0.0,
                             products="finite_difference")
