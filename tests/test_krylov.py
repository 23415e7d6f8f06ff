"""Specification of gmres, minres, normal_cg and nystrom against dense solves."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hypergrad as hg
from hypergrad import testing

D = torch.float64


def _matrix(kind: str, n: int, seed: int, cond: float = 10.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=D)
    if kind == "spd":
        return (q * eig) @ q.T
    if kind == "indefinite":
        signs = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(D)
        return (q * (eig * signs)) @ q.T
    # non-symmetric, well conditioned: SPD plus a skew part
    skew = torch.randn(n, n, generator=g, dtype=D)
    return (q * eig) @ q.T + 0.5 * (skew - skew.T)


def _rhs(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, generator=g, dtype=D)
    return {"a": x[: n // 2], "b": x[n // 2 :]}


def _mv(A: torch.Tensor):
    n1 = None

    def mv(v):
        nonlocal n1
        n1 = v["a"].numel()
        x = A @ torch.cat([v["a"], v["b"]])
        return {"a": x[:n1], "b": x[n1:]}

    return mv


def _dense(b):
    return torch.cat([b["a"], b["b"]])


SOLVERS = {
    "spd": ["cg", "minres", "gmres", "normal_cg"],
    "indefinite": ["minres", "gmres", "normal_cg"],
    "nonsymmetric": ["gmres", "normal_cg"],
}


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(["spd", "indefinite", "nonsymmetric"]),
    n=st.integers(2, 12),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_solvers_match_dense_solve(kind, n, seed, data):
    name = data.draw(st.sampled_from(SOLVERS[kind]))
    A = _matrix(kind, n, seed)
    b = _rhs(n, seed)
    kw = {"maxiter": 10 * n, "tol": 1e-12}
    if name == "normal_cg":
        kw["rmatvec"] = _mv(A.T.contiguous()) if kind == "nonsymmetric" else None
        kw["tol"] = 1e-9  # CG on A^T A: the condition number is squared
    if name == "gmres":
        kw["restart"] = n
    res = getattr(hg, name)(_mv(A), b, **kw)
    x = torch.linalg.solve(A, _dense(b))
    err = torch.linalg.vector_norm(_dense(res.solution) - x) / torch.linalg.vector_norm(x)
    assert err < 1e-7, (name, kind, float(err), res)
    assert bool(res.converged)
    true_res = torch.linalg.vector_norm(_dense(b) - A @ _dense(res.solution))
    assert true_res / torch.linalg.vector_norm(_dense(b)) < 1e-7


def test_minres_on_indefinite_where_cg_flags_nonpositive_curvature():
    A = _matrix("indefinite", 8, 3)
    b = _rhs(8, 3)
    assert bool(hg.cg(_mv(A), b, maxiter=50).stats["nonpositive_curvature"])
    res = hg.minres(_mv(A), b, maxiter=50, tol=1e-12)
    torch.testing.assert_close(_dense(res.solution), torch.linalg.solve(A, _dense(b)))


def test_gmres_restart_still_converges_and_counts_matvecs():
    A = _matrix("nonsymmetric", 20, 5)
    b = _rhs(20, 5)
    res = hg.gmres(_mv(A), b, restart=5, maxiter=400, tol=1e-10)
    assert bool(res.converged)
    torch.testing.assert_close(_dense(res.solution), torch.linalg.solve(A, _dense(b)))
    calls = []
    hg.gmres(lambda v: calls.append(1) or _mv(A)(v), b, restart=5, maxiter=37, tol=1e-14)
    assert len(calls) <= 37


@pytest.mark.parametrize("name", ["minres", "gmres", "normal_cg", "cg", "neumann"])
def test_damping_solves_shifted_system(name):
    A = _matrix("spd", 6, 1)
    b = _rhs(6, 1)
    kw = {"iterations": 2000, "alpha": "auto"} if name == "neumann" else {"maxiter": 200}
    res = getattr(hg, name)(_mv(A), b, damping=0.7, tol=1e-12, **kw)
    x = torch.linalg.solve(A + 0.7 * torch.eye(6, dtype=D), _dense(b))
    torch.testing.assert_close(_dense(res.solution), x)


def test_nystrom_exact_for_low_rank_plus_rho():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(10, 3, generator=g, dtype=D)
    H = U @ U.T  # rank 3
    b = _rhs(10, 0)
    rho = 0.5
    for sketch in ("gaussian", "columns"):
        res = hg.nystrom(_mv(H), b, rank=3 if sketch == "gaussian" else 10, rho=rho,
                         sketch=sketch)
        x = torch.linalg.solve(H + rho * torch.eye(10, dtype=D), _dense(b))
        torch.testing.assert_close(_dense(res.solution), x)


def test_nystrom_reports_true_residual_and_is_deterministic():
    A = _matrix("spd", 12, 2, cond=1e3)
    b = _rhs(12, 2)
    r1 = hg.nystrom(_mv(A), b, rank=4, rho=1e-2, seed=3)
    r2 = hg.nystrom(_mv(A), b, rank=4, rho=1e-2, seed=3)
    # same sketch (seeded); LAPACK may differ in the last bits between calls
    torch.testing.assert_close(_dense(r1.solution), _dense(r2.solution), rtol=1e-12, atol=0)
    true = torch.linalg.vector_norm(_dense(b) - A @ _dense(r1.solution)) / torch.linalg.vector_norm(
        _dense(b))
    torch.testing.assert_close(r1.residual_norm, true)
    assert not bool(r1.converged)  # rank 4 of a full-rank 12 x 12 is an approximation


@pytest.mark.parametrize("solver", [
    functools.partial(hg.minres, tol=1e-12),
    functools.partial(hg.gmres, tol=1e-12),
    functools.partial(hg.normal_cg, tol=1e-10),
])
def test_new_solvers_plug_into_implicit_grad(solver):
    prob = testing.ridge_problem(seed=4, n_features=6)
    g = hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                         solver=solver)
    assert testing.compare(g, prob.hypergrad).rel_error < 1e-7


def test_nystrom_full_rank_in_implicit_grad_matches_closed_form():
    prob = testing.ridge_problem(seed=5, n_features=5)
    solver = functools.partial(hg.nystrom, rank=5, rho=1e-13)  # stable as rho -> 0
    g = hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                         solver=solver)
    assert testing.compare(g, prob.hypergrad).rel_error < 1e-10


def test_stochastic_hvp_mean_over_batches_matches_full_batch():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 4, generator=g, dtype=D)
    y = torch.randn(400, generator=g, dtype=D)

    def loss(w, h, idx):
        return (torch.log1p(torch.exp(X[idx] @ w * y[idx]))).mean() + h * (w**4).sum()

    w = torch.randn(4, generator=g, dtype=D)
    h = torch.tensor(0.1, dtype=D)
    v = torch.randn(4, generator=g, dtype=D)
    batches = [torch.arange(i, i + 20) for i in range(0, 400, 20)]  # a partition
    mv = hg.stochastic_hvp(loss, w, h, iter(batches))
    mean = sum(mv(v) for _ in batches) / len(batches)
    full = hg.hvp(lambda p: loss(p, h, torch.arange(400)), w, v)
    torch.testing.assert_close(mean, full)
    with pytest.raises(RuntimeError, match="batches"):
        mv(v)


@pytest.mark.parametrize("call, match", [
    (lambda b: hg.minres(lambda v: v, b, maxiter=-1), "maxiter"),
    (lambda b: hg.gmres(lambda v: v, b, restart=0), "restart"),
    (lambda b: hg.gmres(lambda v: v, b, damping=-1.0), "damping"),
    (lambda b: hg.normal_cg(lambda v: v, b, rmatvec=3), "rmatvec"),
    (lambda b: hg.nystrom(lambda v: v, b, rank=0), "rank"),
    (lambda b: hg.nystrom(lambda v: v, b, rho=0.0), "rho"),
    (lambda b: hg.nystrom(lambda v: v, b, sketch="svd"), "sketch"),
    (lambda b: hg.minres(lambda v: {"zz": v}, b), "matvec"),
    (lambda b: hg.normal_cg(lambda v: v, b, rmatvec=lambda v: {"zz": v["a"]}),
     r"`rmatvec` must map a pytree like `b`"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call({"a": torch.ones(3, dtype=D)})


# ---- stable Nystrom (issue 13.2) -------------------------------------------------------------


def _mv_dense(A: torch.Tensor):
    return lambda v: A @ v


def _spd5(cond: float = 1.8e3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=D))
    return (q * torch.logspace(0, torch.log10(torch.tensor(cond)).item(), 5, dtype=D)) @ q.T


@pytest.mark.parametrize("sketch", ["columns", "gaussian"])
@pytest.mark.parametrize("rho", [1e-6, 1e-10, 1e-12, 1e-14])
def test_nystrom_full_sketch_is_the_regularised_solve_as_rho_goes_to_zero(sketch, rho):
    """Regression: with a full-rank sketch of a 5x5 SPD matrix (cond 1.8e3) the Woodbury form
    lost 5e-1 (columns, rho 1e-10) to 1e1 (1e-12) of relative accuracy; the stable solve is the
    regularised solve to rounding, and so H^{-1} b as rho -> 0."""
    for seed in range(3):
        H = _spd5(seed=seed)
        b = torch.randn(5, generator=torch.Generator().manual_seed(10 + seed), dtype=D)
        res = hg.nystrom(_mv_dense(H), b, rank=5, rho=rho, sketch=sketch)
        ref = torch.linalg.solve(H + rho * torch.eye(5, dtype=D), b)
        err = float((res.solution - ref).norm() / ref.norm())
        assert err < 1e-11, (seed, err)
        exact = torch.linalg.solve(H, b)
        assert float((res.solution - exact).norm() / exact.norm()) < 1e-11 + 10 * rho * 1.8e3


def test_nystrom_low_rank_sketch_matches_the_dense_nystrom_formula():
    """k < n: x = (H_nys + rho I)^{-1} b with H_nys = Y (Omega^T Y)^+ Y^T, built densely here
    from the same orthonormal columns sketch."""
    H = _matrix("spd", 12, 6, cond=50.0)
    b = _dense(_rhs(12, 6))
    res = hg.nystrom(lambda v: H @ v, b, rank=4, rho=1e-2, sketch="columns", seed=2)
    idx = torch.randperm(12, generator=torch.Generator().manual_seed(2))[:4]
    omega = torch.zeros(12, 4, dtype=D)
    omega[idx, torch.arange(4)] = 1.0
    Y = H @ omega
    H_nys = Y @ torch.linalg.pinv(omega.T @ Y) @ Y.T
    ref = torch.linalg.solve(H_nys + 1e-2 * torch.eye(12, dtype=D), b)
    torch.testing.assert_close(res.solution, ref, rtol=1e-9, atol=1e-12)
    assert not bool(res.stats["nonpositive_curvature"])


def test_nystrom_flags_negative_curvature_in_the_sketch():
    A = _matrix("indefinite", 6, 1)
    res = hg.nystrom(_mv(A), _rhs(6, 1), rank=6, rho=1e-3)
    assert bool(res.stats["nonpositive_curvature"])
    assert res.stats["residual_estimate"] is False


# ---- MINRES curvature and warm starts (issue 14.7) --------------------------------------------


def test_minres_reports_curvature_like_cg():
    """Switching to MINRES must not hide an indefinite Hessian: it reports the extreme Ritz
    values (Rayleigh quotients over its Krylov space) and the certificate min <= 0."""
    A = _matrix("indefinite", 10, 4)
    res = hg.minres(_mv(A), _rhs(10, 4), maxiter=100, tol=1e-12)
    eig = torch.linalg.eigvalsh(A)
    lo, hi = float(res.stats["min_rayleigh"]), float(res.stats["max_rayleigh"])
    assert bool(res.stats["nonpositive_curvature"]) and lo < 0
    assert float(eig[0]) - 1e-9 <= lo and hi <= float(eig[-1]) + 1e-9
    assert lo == pytest.approx(float(eig[0]), rel=1e-6)  # converged Ritz values: the extremes
    spd = _matrix("spd", 10, 4, cond=20.0)
    ok = hg.minres(_mv(spd), _rhs(10, 4), maxiter=100, tol=1e-12)
    assert not bool(ok.stats["nonpositive_curvature"])
    assert 1.0 - 1e-9 <= float(ok.stats["min_rayleigh"]) <= float(ok.stats["max_rayleigh"])
    assert float(ok.stats["max_rayleigh"]) <= 20.0 + 1e-9
    for key in ("stagnated", "residual_estimate", "residual_checked"):
        assert key in ok.stats


def test_minres_certificate_beyond_the_diagonal_of_T():
    """[[1, 2], [2, 1]] (eigenvalues 3, -1) from b = e1: every Lanczos vector has v^T A v = 1
    > 0, but the Ritz values show -1: the certificate uses T's spectrum, not its diagonal."""
    A = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=D)
    res = hg.minres(lambda v: A @ v, torch.tensor([1.0, 0.0], dtype=D))
    assert bool(res.stats["nonpositive_curvature"])
    assert float(res.stats["min_rayleigh"]) == pytest.approx(-1.0)


def test_minres_flags_a_nonsymmetric_operator_and_still_reports_the_true_residual():
    A = _matrix("nonsymmetric", 8, 2)
    b = _rhs(8, 2)
    res = hg.minres(_mv(A), b, maxiter=30)
    assert res.stats["nonsymmetric"] is True and res.stats["residual_checked"] is True
    bd = _dense(b)
    true = torch.linalg.vector_norm(bd - A @ _dense(res.solution)) / torch.linalg.vector_norm(bd)
    torch.testing.assert_close(res.residual_norm, true)
    assert not hg.minres(_mv(_matrix("spd", 8, 2)), b).stats["nonsymmetric"]


@pytest.mark.parametrize("name", ["minres", "gmres"])
def test_minres_and_gmres_warm_start(name):
    A = _matrix("indefinite" if name == "minres" else "nonsymmetric", 80, 8)
    b = _rhs(80, 8)
    x_star = torch.linalg.solve(A, _dense(b))
    at = getattr(hg, name)(_mv(A), b, x0={"a": x_star[:40], "b": x_star[40:]}, tol=1e-8)
    assert bool(at.converged) and int(at.iterations) == 1  # one matvec to check x0
    near = {"a": x_star[:40] + 1e-4, "b": x_star[40:] - 1e-4}
    kw = {"tol": 1e-7, "maxiter": 400}
    cold = getattr(hg, name)(_mv(A), b, **kw)
    warm = getattr(hg, name)(_mv(A), b, x0=near, **kw)
    assert bool(cold.converged) and bool(warm.converged)
    assert int(warm.iterations) < int(cold.iterations)
    torch.testing.assert_close(_dense(warm.solution), x_star, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="x0"):
        getattr(hg, name)(_mv(A), b, x0={"a": torch.ones(40, dtype=D)})


def test_minres_stagnates_on_a_singular_inconsistent_system_and_says_so():
    A = _matrix("spd", 10, 9)
    A = A - torch.linalg.eigvalsh(A)[0] * torch.eye(10, dtype=D)  # PSD, one zero eigenvalue
    res = hg.minres(_mv(A), _rhs(10, 9), maxiter=50)
    assert not bool(res.converged) and bool(res.stats["stagnated"])
