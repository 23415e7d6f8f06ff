"""cg and neumann: they solve, they count, they report how it went, and never return NaN."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hypergrad as hg


def spd(n: int, cond: float, seed: int = 0, eigs: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    if eigs is None:
        eigs = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    return (q * eigs) @ q.T


def rhs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def true_residual(A, x, b) -> float:
    return float((b - A @ x).norm() / b.norm())


# ---- cg -------------------------------------------------------------------------------------


# In exact arithmetic CG ends in <= n steps; in floating point, rounding delays it on badly
# conditioned matrices (n=30, cond=50 takes 35 steps here and in scipy's cg alike). At cond <= ~30
# and n <= 30 the delay measured over many seeds is at most 1 step, so the bound is n + 2.
@pytest.mark.parametrize("n", [1, 2, 10, 30])
def test_cg_converges_in_at_most_n_iterations_and_reports_it(n):
    A, b = spd(n, cond=10.0, seed=n), rhs(n)
    res = hg.cg(lambda v: A @ v, b, maxiter=10 * n, tol=1e-10)
    assert bool(res.converged)
    assert 1 <= int(res.iterations) <= n + 2
    assert float(res.residual_norm) <= 1e-10
    assert float(res.residual_norm) == pytest.approx(true_residual(A, res.solution, b), abs=1e-13)
    torch.testing.assert_close(res.solution, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    assert not bool(res.stats["nonpositive_curvature"])
    assert res.iterations.dtype == torch.int64 and res.converged.dtype == torch.bool
    assert res.residual_norm.shape == () and res.residual_norm.dtype == torch.float64


@given(n=st.integers(1, 16), log_cond=st.floats(0.0, 1.5), seed=st.integers(0, 10_000))
def test_cg_iteration_bound_property(n, log_cond, seed):
    A, b = spd(n, 10**log_cond, seed), rhs(n, seed + 1)
    res = hg.cg(lambda v: A @ v, b, maxiter=5 * n, tol=1e-10)
    assert bool(res.converged) and int(res.iterations) <= n + 2
    assert true_residual(A, res.solution, b) < 1e-9


def test_cg_needs_only_as_many_iterations_as_distinct_eigenvalues():
    eigs = torch.tensor([1.0, 4.0, 9.0]).repeat_interleave(7)  # n = 21, three distinct values
    A, b = spd(21, 0, seed=3, eigs=eigs), rhs(21)
    res = hg.cg(lambda v: A @ v, b, maxiter=100, tol=1e-10)
    assert bool(res.converged) and int(res.iterations) <= 4


def test_cg_stops_at_maxiter_and_says_so():
    A, b = spd(20, cond=1e3), rhs(20)
    res = hg.cg(lambda v: A @ v, b, maxiter=3, tol=1e-12)
    assert int(res.iterations) == 3 and not bool(res.converged)
    assert float(res.residual_norm) > 1e-12
    assert float(res.residual_norm) == pytest.approx(true_residual(A, res.solution, b), rel=1e-8)
    zero = hg.cg(lambda v: A @ v, b, maxiter=0)
    assert int(zero.iterations) == 0 and float(zero.residual_norm) == 1.0
    assert torch.equal(zero.solution, torch.zeros(20))


@pytest.mark.parametrize("damping", [0.1, 3.0])
def test_cg_with_damping_solves_the_shifted_system(damping):
    A, b = spd(12, cond=100.0, seed=4), rhs(12)
    res = hg.cg(lambda v: A @ v, b, damping=damping, tol=1e-12, maxiter=50)
    shifted = A + damping * torch.eye(12)
    torch.testing.assert_close(res.solution, torch.linalg.solve(shifted, b), rtol=1e-9, atol=1e-12)
    assert float(res.residual_norm) == pytest.approx(
        true_residual(shifted, res.solution, b), abs=1e-13
    )
    # damping makes a singular PSD matrix solvable
    P = torch.diag(torch.tensor([0.0, 1.0, 2.0]))
    r = hg.cg(lambda v: P @ v, torch.ones(3), damping=0.5, tol=1e-12)
    torch.testing.assert_close(r.solution, 1 / (torch.tensor([0.0, 1.0, 2.0]) + 0.5))


def test_cg_honours_x0():
    A, b = spd(15, cond=100.0, seed=5), rhs(15)
    x_star = torch.linalg.solve(A, b)
    # starting at the answer: one matvec to check it, no iterations, x0 returned
    at = hg.cg(lambda v: A @ v, b, x0=x_star, tol=1e-8)
    assert bool(at.converged) and int(at.iterations) == 1
    torch.testing.assert_close(at.solution, x_star, rtol=0, atol=0)
    # maxiter=0 returns x0 itself with its true residual
    x0 = x_star + 1e-3 * rhs(15, seed=9)
    stay = hg.cg(lambda v: A @ v, b, x0=x0, maxiter=0)
    torch.testing.assert_close(stay.solution, x0, rtol=0, atol=0)
    assert float(stay.residual_norm) == pytest.approx(true_residual(A, x0, b), rel=1e-10)
    # a warm start near the answer needs fewer matvecs to the same tolerance than a cold one
    cold = hg.cg(lambda v: A @ v, b, tol=1e-6)
    warm = hg.cg(lambda v: A @ v, b, x0=x0, tol=1e-6)
    assert bool(warm.converged) and int(warm.iterations) < int(cold.iterations)
    torch.testing.assert_close(warm.solution, x_star, rtol=1e-5, atol=1e-6)


def test_cg_flags_nonpositive_curvature_on_indefinite_matrix():
    g = torch.Generator().manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    A = (q * torch.tensor([-2.0, -0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])) @ q.T
    res = hg.cg(lambda v: A @ v, rhs(8), tol=1e-10, maxiter=50)
    assert bool(res.stats["nonpositive_curvature"])
    assert not bool(res.converged)
    assert hg.tree.all_finite(res.solution)
    # negative definite: flagged on the very first direction
    neg = hg.cg(lambda v: -v, rhs(8))
    assert bool(neg.stats["nonpositive_curvature"]) and int(neg.iterations) == 1
    assert float(neg.stats["min_rayleigh"]) == pytest.approx(-1.0)


def test_cg_rayleigh_bounds_bracket_the_spectrum_seen():
    A = spd(10, cond=20.0, seed=7)
    res = hg.cg(lambda v: A @ v, rhs(10), tol=1e-12)
    lo, hi = float(res.stats["min_rayleigh"]), float(res.stats["max_rayleigh"])
    assert 1.0 - 1e-9 <= lo <= hi <= 20.0 + 1e-9


def test_cg_zero_rhs_returns_zero_solution():
    res = hg.cg(lambda v: 2 * v, torch.zeros(4))
    assert bool(res.converged) and int(res.iterations) == 0
    assert torch.equal(res.solution, torch.zeros(4)) and float(res.residual_norm) == 0.0


def test_cg_on_pytrees():
    A1, A2 = spd(3, 5.0, seed=1), spd(4, 5.0, seed=2)
    b = {"u": rhs(3), "v": (rhs(4, seed=2),)}

    def matvec(t):
        return {"u": A1 @ t["u"], "v": (A2 @ t["v"][0],)}

    res = hg.cg(matvec, b, tol=1e-12)
    assert bool(res.converged) and int(res.iterations) <= 7 + 1
    torch.testing.assert_close(res.solution["u"], torch.linalg.solve(A1, b["u"]))
    torch.testing.assert_close(res.solution["v"][0], torch.linalg.solve(A2, b["v"][0]))


def test_cg_float32_smoke():
    A, b = spd(10, cond=10.0).float(), rhs(10).float()
    res = hg.cg(lambda v: A @ v, b, tol=1e-5)
    assert bool(res.converged) and res.solution.dtype == torch.float32
    assert res.residual_norm.dtype == torch.float32
    torch.testing.assert_close(res.solution, torch.linalg.solve(A, b), rtol=1e-4, atol=1e-5)


# ---- neumann --------------------------------------------------------------------------------


def neumann_by_hand(A, b, alpha, J):
    M = torch.eye(A.shape[0]) - alpha * A
    x, term = torch.zeros_like(b), b.clone()
    for _ in range(J):
        x = x + alpha * term
        term = M @ term
    return x


@pytest.mark.parametrize("solve", [
    lambda b: hg.neumann(lambda v: 2 * v, b, iterations=3, alpha=0.1),
    lambda b: hg.neumann(lambda v: 2 * v, b, iterations=3),  # alpha="auto"
    lambda b: hg.sama(lambda v: v, b),
], ids=["neumann", "neumann-auto", "sama"])
def test_every_tensor_of_the_result_lives_on_bs_device(solve):
    """``iterations`` too (it was made on the CPU): the read-free solvers run on the "meta"
    device, which has no values, so any tensor made elsewhere shows up."""
    res = solve(torch.ones(3, device="meta"))
    for name, t in (("iterations", res.iterations), ("residual_norm", res.residual_norm),
                    ("converged", res.converged), ("solution", res.solution)):
        assert t.device.type == "meta", name
    assert res.iterations.dtype == torch.int64 and res.iterations.shape == ()


@pytest.mark.parametrize("J", [0, 1, 2, 5, 40])
def test_neumann_is_the_truncated_series_with_exact_residual(J):
    """J terms cost J - 1 matvecs; the free residual is that of the (J-1)-term sum (flagged an
    estimate, and an upper bound here: SPD, alpha < 2 / lambda_max); exact_residual=True pays
    one more matvec for the residual of the returned J-term sum."""
    A, b = spd(6, cond=8.0, seed=8), rhs(6)
    alpha = 0.1
    res = hg.neumann(lambda v: A @ v, b, iterations=J, alpha=alpha, tol=1e-6)
    torch.testing.assert_close(res.solution, neumann_by_hand(A, b, alpha, J), rtol=1e-12, atol=0)
    assert int(res.iterations) == max(J - 1, 0)
    assert res.stats["residual_estimate"] is (J >= 1)
    previous = true_residual(A, neumann_by_hand(A, b, alpha, max(J - 1, 0)), b)
    assert float(res.residual_norm) == pytest.approx(previous, rel=1e-10, abs=1e-15)
    assert float(res.residual_norm) >= true_residual(A, res.solution, b) * (1 - 1e-12)
    assert bool(res.converged) == (float(res.residual_norm) <= 1e-6)
    exact = hg.neumann(lambda v: A @ v, b, iterations=J, alpha=alpha, tol=1e-6,
                       exact_residual=True)
    torch.testing.assert_close(exact.solution, res.solution, rtol=0, atol=0)
    assert int(exact.iterations) == J and exact.stats["residual_estimate"] is False
    assert float(exact.residual_norm) == pytest.approx(
        true_residual(A, exact.solution, b), rel=1e-10, abs=1e-15
    )
    assert bool(exact.converged) == (float(exact.residual_norm) <= 1e-6)


def test_neumann_with_enough_terms_solves_the_system():
    A, b = spd(10, cond=10.0, seed=9), rhs(10)
    res = hg.neumann(lambda v: A @ v, b, iterations=500, alpha=1.0 / 10.0, tol=1e-10)
    assert bool(res.converged)
    torch.testing.assert_close(res.solution, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.25, 1e3])  # 2 / lambda_max = 0.2
def test_neumann_too_large_alpha_diverges_loudly_and_finitely(alpha):
    A, b = spd(10, cond=10.0, seed=9), rhs(10)
    for exact in (False, True):
        res = hg.neumann(lambda v: A @ v, b, iterations=400, alpha=alpha, exact_residual=exact)
        assert not bool(res.converged)
        r = float(res.residual_norm)
        assert r > 1.0 or math.isinf(r)
        assert hg.tree.all_finite(res.solution), "a diverged Neumann series must not return NaN"
        if exact and math.isfinite(r):  # the exact residual is that of the returned x
            assert r == pytest.approx(true_residual(A, res.solution, b), rel=1e-6)


def test_neumann_overflow_keeps_the_last_finite_sum_with_inf_residual():
    """No host read per product, so no early stop: every matvec is spent (semantic change),
    but the solution is the last finite partial sum and the matvec never sees NaN/inf."""
    A, b = spd(10, cond=10.0, seed=9), rhs(10)
    seen_finite = []

    def mv(v):
        seen_finite.append(bool(torch.isfinite(v).all()))
        return A @ v

    res = hg.neumann(mv, b, iterations=200, alpha=1e6)
    assert math.isinf(float(res.residual_norm)) and not bool(res.converged)
    assert int(res.iterations) == 199 and all(seen_finite)
    assert hg.tree.all_finite(res.solution)
    # it is the last finite partial sum: the same as the series cut where it overflows
    k = max(j for j in range(1, 200) if hg.tree.all_finite(neumann_by_hand(A, b, 1e6, j)))
    torch.testing.assert_close(res.solution, neumann_by_hand(A, b, 1e6, k), rtol=1e-12, atol=0)


def test_neumann_auto_alpha_converges_where_hand_picked_alpha_diverges():
    A, b = spd(10, cond=10.0, seed=9), rhs(10)
    lam_max = float(torch.linalg.eigvalsh(A).max())
    bad = hg.neumann(lambda v: A @ v, b, iterations=300, alpha=2.5 / lam_max)
    assert not bool(bad.converged)
    auto = hg.neumann(lambda v: A @ v, b, iterations=300, alpha="auto", tol=1e-8)
    assert bool(auto.converged)
    assert 0.5 * lam_max < float(auto.stats["lambda_max"]) <= lam_max * (1 + 1e-12)
    assert float(auto.stats["alpha"]) == pytest.approx(1.0 / float(auto.stats["lambda_max"]))
    assert 0 < float(auto.stats["alpha"]) < 2.0 / lam_max
    # power-iteration matvecs are counted (20), the 300 terms cost 299; the free residual
    # bounds the true one (SPD, alpha < 2 / lambda_max)
    assert int(auto.iterations) == 299 + 20 and auto.stats["residual_estimate"]
    assert float(auto.residual_norm) >= true_residual(A, auto.solution, b)
    assert not bool(auto.stats["nonpositive_curvature"])
    torch.testing.assert_close(auto.solution, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-7)


def test_neumann_auto_flags_a_negative_dominant_eigenvalue():
    A = -spd(5, cond=4.0, seed=10)
    res = hg.neumann(lambda v: A @ v, rhs(5), iterations=20, alpha="auto")
    assert bool(res.stats["nonpositive_curvature"]) and not bool(res.converged)
    assert hg.tree.all_finite(res.solution)


def test_neumann_zero_rhs_and_pytrees():
    z = hg.neumann(lambda v: {"a": 2 * v["a"]}, {"a": torch.zeros(3)}, iterations=5, alpha=0.1)
    assert bool(z.converged) and torch.equal(z.solution["a"], torch.zeros(3))
    assert float(z.residual_norm) == 0.0
    b = {"a": rhs(3), "b": [rhs(2, seed=3)]}
    res = hg.neumann(
        lambda t: {"a": 2 * t["a"], "b": [4 * t["b"][0]]}, b, iterations=60, alpha=0.2, tol=1e-10
    )
    assert bool(res.converged)
    torch.testing.assert_close(res.solution["a"], b["a"] / 2)
    torch.testing.assert_close(res.solution["b"][0], b["b"][0] / 4)


def test_power_iteration_estimates_the_largest_eigenvalue():
    A = spd(12, cond=30.0, seed=11)
    lam, used = hg.power_iteration(lambda v: A @ v, rhs(12), iterations=200)
    assert float(lam) == pytest.approx(30.0, rel=1e-6) and used == 200
    # an exact eigenvector: the estimate is exact at once, every matvec is counted
    lam2, used2 = hg.power_iteration(lambda v: 3.0 * v, torch.ones(4), iterations=5)
    assert float(lam2) == pytest.approx(3.0) and used2 == 5
    # a zero operator: the estimate is 0 and stays 0; every matvec is spent (no host read
    # per product to stop early)
    lam0, used0 = hg.power_iteration(lambda v: 0.0 * v, torch.ones(4), iterations=5)
    assert float(lam0) == 0.0 and used0 == 5


# ---- preconditioned neumann -----------------------------------------------------------------
def test_preconditioned_neumann_is_the_preconditioned_series_with_exact_residual():
    """x = sum_{j<J} (I - alpha D H)^j alpha D b, and b - H x is reported exactly."""
    A, b = spd(6, cond=8.0, seed=11), rhs(6)
    D = torch.rand(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.2
    alpha, J = 0.1, 7
    res = hg.neumann(lambda v: A @ v, b, iterations=J, alpha=alpha, preconditioner=D,
                     exact_residual=True)
    M = torch.eye(6, dtype=torch.float64) - alpha * D[:, None] * A
    x, term = torch.zeros(6, dtype=torch.float64), alpha * D * b
    for _ in range(J):
        x, term = x + term, M @ term
    torch.testing.assert_close(res.solution, x, rtol=1e-12, atol=0)
    assert float(res.residual_norm) == pytest.approx(true_residual(A, x, b), rel=1e-10)


def test_preconditioner_c_times_identity_equals_alpha_times_c():
    A, b = spd(5, cond=5.0, seed=12), {"w": rhs(5)}
    plain = hg.neumann(lambda v: {"w": A @ v["w"]}, b, iterations=9, alpha=0.06)
    pre = hg.neumann(lambda v: {"w": A @ v["w"]}, b, iterations=9, alpha=0.2,
                     preconditioner={"w": torch.full((5,), 0.3, dtype=torch.float64)})
    torch.testing.assert_close(pre.solution, plain.solution, rtol=1e-12, atol=0)


def test_jacobi_preconditioner_solves_a_badly_scaled_system_in_far_fewer_terms():
    """Coordinates with curvature 1..1e4: the plain series (alpha = 1/lambda_max) barely moves
    the flat ones in 50 terms; with D = 1/diag(H) and alpha='auto' it converges."""
    g = torch.Generator().manual_seed(3)
    s = torch.logspace(0, 2, 8, dtype=torch.float64)
    C = spd(8, cond=2.0, seed=13)
    A = s[:, None] * C * s[None, :]  # badly scaled, well conditioned after Jacobi scaling
    b = torch.randn(8, generator=g, dtype=torch.float64)
    plain = hg.neumann(lambda v: A @ v, b, iterations=50, alpha="auto")
    jac = hg.neumann(lambda v: A @ v, b, iterations=50, alpha="auto",
                     preconditioner=1 / torch.diagonal(A), tol=1e-8)
    assert float(plain.residual_norm) > 0.1
    assert bool(jac.converged)
    Dh = torch.diagonal(A) ** -0.5  # 'auto' estimates the top eigenvalue of D^1/2 A D^1/2
    lam = float(torch.linalg.eigvalsh(Dh[:, None] * A * Dh[None, :]).max())
    assert 0.5 * lam < float(jac.stats["lambda_max"]) <= lam * (1 + 1e-12)
    torch.testing.assert_close(jac.solution, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([1.0, -1.0, 1.0]), "finite and > 0"),
    (torch.tensor([1.0, float("nan"), 1.0]), "finite and > 0"),
    (torch.ones(4), "same structure"),
    ({"a": torch.ones(3)}, "preconditioner"),
])
def test_preconditioner_must_be_positive_and_shaped_like_b(bad, match):
    with pytest.raises(ValueError, match=match):
        hg.neumann(lambda v: v, torch.ones(3), iterations=2, alpha=0.5, preconditioner=bad)


# ---- tolerances by dtype (issue 14.7) --------------------------------------------------------


def test_default_tol_follows_the_dtype():
    assert hg.default_tol(torch.float64) == 1e-10 and hg.default_tol(torch.float32) == 1e-5
    assert hg.default_tol(torch.float16) == 1e-2 and hg.default_tol(torch.bfloat16) == 1e-2
    with pytest.raises(TypeError, match="dtype"):
        hg.default_tol(torch.int64)
    A, b = spd(30, cond=100.0, seed=3), rhs(30)
    for name in ("cg", "minres", "gmres"):  # tol=None: float64 solves reach 1e-10
        res = getattr(hg, name)(lambda v: A @ v, b, maxiter=300)
        assert bool(res.converged) and true_residual(A, res.solution, b) <= 1.1e-10
        assert float(res.residual_norm) > 1e-13  # ... and stop there, not at rounding level
    res32 = hg.cg(lambda v: A.float() @ v, b.float(), maxiter=300)
    assert bool(res32.converged) and float(res32.residual_norm) <= 1e-5
    true32 = float((b - A @ res32.solution.double()).norm() / b.norm())
    assert true32 <= 1.1e-5
    neu = hg.neumann(lambda v: A @ v, b, iterations=5000, alpha=0.01)
    assert bool(neu.converged) == (float(neu.residual_norm) <= 1e-10)


# ---- cg: one read per check, true residual, stagnation (issues 13.3, 13.6, 13.8) -------------


def test_cg_residual_of_x_zero_is_exactly_one():
    """Regression: 1.0000000000000002 (||b|| and sqrt(b^T b) were two different sums)."""
    for seed in range(20):
        b = rhs(37, seed)
        res = hg.cg(lambda v: 3 * v, b, maxiter=0)
        assert float(res.residual_norm) == 1.0


@pytest.mark.parametrize("every", [2, 3, 7])
def test_cg_check_every_equals_stopping_exactly(every):
    """Masked steps after convergence leave x alone: the result is bit-identical to reading
    every iteration, `iterations` counts the active steps, at most every - 1 more are spent."""
    A, b = spd(40, cond=300.0, seed=5), rhs(40)
    for maxiter, tol in [(200, 1e-10), (11, 1e-12), (200, 1e-3)]:
        ref = hg.cg(lambda v: A @ v, b, maxiter=maxiter, tol=tol)
        res = hg.cg(lambda v: A @ v, b, maxiter=maxiter, tol=tol, check_every=every)
        torch.testing.assert_close(res.solution, ref.solution, rtol=0, atol=0)
        assert int(res.iterations) == int(ref.iterations)
        assert torch.equal(res.residual_norm, ref.residual_norm)
        assert bool(res.converged) == bool(ref.converged)
        assert 0 <= res.stats["matvecs"] - ref.stats["matvecs"] < every
    # a stop on non-positive curvature is exact too
    neg = torch.diag(torch.tensor([3.0, 2.0, -1.0, 4.0, 5.0]))
    r1 = hg.cg(lambda v: neg @ v, torch.ones(5))
    r4 = hg.cg(lambda v: neg @ v, torch.ones(5), check_every=4)
    torch.testing.assert_close(r4.solution, r1.solution, rtol=0, atol=0)
    assert bool(r4.stats["nonpositive_curvature"]) and int(r4.iterations) == int(r1.iterations)


def test_cg_nan_product_never_reaches_the_iterate():
    """A matvec that returns NaN is a failed curvature test (flagged), not a NaN solution."""
    A, b = spd(6, cond=5.0, seed=2), rhs(6)
    calls = []

    def mv(v):
        calls.append(1)
        return A @ v if len(calls) < 3 else torch.full_like(v, float("nan"))

    res = hg.cg(mv, b, maxiter=20)
    assert bool(res.stats["nonpositive_curvature"]) and not bool(res.converged)
    assert hg.tree.all_finite(res.solution)


def test_cg_stagnation_flag():
    """Singular inconsistent PSD: the residual cannot go below ||P_null b||; CG says it
    stagnated. A solve that converges, or merely runs out of iterations while still making
    progress, does not."""
    eigs = torch.cat([torch.zeros(3), torch.logspace(0, 1, 17)]).double()
    A, b = spd(20, 0, seed=4, eigs=eigs), rhs(20)
    stuck = hg.cg(lambda v: A @ v, b, maxiter=60, tol=1e-12)
    assert not bool(stuck.converged) and bool(stuck.stats["stagnated"])
    ok = hg.cg(lambda v: (A + torch.eye(20)) @ v, b, maxiter=60)
    assert bool(ok.converged) and not bool(ok.stats["stagnated"])
    short = hg.cg(lambda v: A @ v, b, maxiter=8, tol=1e-12)
    assert not bool(short.converged) and not bool(short.stats["stagnated"])  # < 10 steps
    B = spd(200, cond=30.0, seed=5)  # converging at ~2x per 4 steps, not done in 30
    going = hg.cg(lambda v: B @ v, rhs(200), maxiter=30, tol=1e-14)
    assert not bool(going.converged) and not bool(going.stats["stagnated"])
    # singular: the measured curvature floor is zero to rounding (its sign is rounding's: -1.9e-16
    # or +1.9e-16 depending on how the eigenvalues were computed, so nonpositive_curvature is not
    # a property of this matrix)
    assert abs(float(stuck.stats["min_rayleigh"])) < 1e-12


# ---- neumann: J terms for J - 1 matvecs, warm start (issue 17) -------------------------------


@pytest.mark.parametrize("J", [0, 1, 4, 30])
def test_neumann_warm_start_is_x0_plus_the_series_on_the_residual(J):
    A, b = spd(8, cond=6.0, seed=14), rhs(8)
    D = torch.rand(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    x0 = rhs(8, seed=15)
    alpha, damping = 0.08, 0.2
    Ad = A + damping * torch.eye(8)
    r0 = b - Ad @ x0
    M = torch.eye(8, dtype=torch.float64) - alpha * Ad * D[None, :]  # I - alpha A D
    term, s = r0.clone(), torch.zeros(8, dtype=torch.float64)
    for _ in range(J):
        s, term = s + term, M @ term
    expected = x0 + alpha * D * s
    for exact in (False, True):
        res = hg.neumann(lambda v: A @ v, b, iterations=J, alpha=alpha, damping=damping,
                         preconditioner=D, x0=x0, exact_residual=exact)
        torch.testing.assert_close(res.solution, expected, rtol=1e-12, atol=1e-14)
        assert int(res.iterations) == 1 + max(J - 1, 0) + int(exact and J >= 1)
        true = true_residual(Ad, res.solution, b)
        if exact or J == 0:
            assert not res.stats["residual_estimate"]
            assert float(res.residual_norm) == pytest.approx(true, rel=1e-10)
        else:
            assert res.stats["residual_estimate"]


def test_neumann_warm_start_near_the_answer_needs_fewer_terms():
    A, b = spd(30, cond=20.0, seed=16), rhs(30)
    x_star = torch.linalg.solve(A, b)
    x0 = x_star + 1e-3 * rhs(30, seed=17)
    cold = hg.neumann(lambda v: A @ v, b, iterations=60, alpha=1 / 20, exact_residual=True)
    warm = hg.neumann(lambda v: A @ v, b, iterations=60, alpha=1 / 20, x0=x0,
                      exact_residual=True)
    assert float(warm.residual_norm) < 1e-2 * float(cold.residual_norm)
    assert int(warm.iterations) == int(cold.iterations) + 1


def test_neumann_auto_alpha_stays_a_tensor_and_non_finite_b_is_flagged_not_raised():
    A, b = spd(6, cond=4.0, seed=18), rhs(6)
    res = hg.neumann(lambda v: A @ v, b, iterations=10)
    assert isinstance(res.stats["alpha"], torch.Tensor) and res.stats["alpha"].shape == ()
    bad = hg.neumann(lambda v: A @ v, torch.tensor([1.0, float("nan"), 0, 0, 0, 0]),
                     iterations=10, alpha=0.1)
    assert not bool(bad.converged) and math.isnan(float(bad.residual_norm))
    assert hg.tree.all_finite(bad.solution)


@pytest.mark.parametrize("J", [1, 2, 5])
def test_neumann_non_finite_start_returns_the_start_and_never_touches_b(J):
    """A NaN/inf in b (or in b - A x0) gives x0 (or 0) exactly, with a NaN residual; b itself
    is never written (the masks work on the solver's own tensors only)."""
    A = spd(6, cond=4.0, seed=19)
    b = torch.tensor([1.0, float("nan"), 0, 0, 0, 0], dtype=torch.float64)
    before = b.clone()
    res = hg.neumann(lambda v: A @ v, b, iterations=J, alpha=0.1)
    assert torch.equal(res.solution, torch.zeros(6, dtype=torch.float64))
    assert math.isnan(float(res.residual_norm)) and not bool(res.converged)
    assert torch.equal(b.nan_to_num(7.0), before.nan_to_num(7.0))
    x0 = torch.ones(6, dtype=torch.float64)
    res = hg.neumann(lambda v: {"w": A @ v["w"]}, {"w": b}, iterations=J, alpha=0.1,
                     x0={"w": x0})
    assert torch.equal(res.solution["w"], x0)
    good = rhs(6)
    kept = good.clone()
    hg.neumann(lambda v: A @ v, good, iterations=J, alpha=0.1)
    assert torch.equal(good, kept)
