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
    solver = functools.partial(hg.nystrom, rank=5, rho=1e-9)
    g = hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                         solver=solver)
    assert testing.compare(g, prob.hypergrad).rel_error < 1e-6


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
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call({"a": torch.ones(3, dtype=D)})
