"""hg.sama: SAMA's Adam-preconditioned identity as a solver (no inverse-Hessian solve)."""

from __future__ import annotations

import doctest

import pytest
import torch

import hypergrad as hg
import hypergrad.solvers.sama as sama_module
from hypergrad import tree


def _problem():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    H = (q * torch.linspace(1.0, 10.0, 5, dtype=torch.float64)) @ q.T
    b = {"a": torch.randn(3, generator=g, dtype=torch.float64),
         "b": torch.randn(2, generator=g, dtype=torch.float64)}
    d = {"a": torch.rand(3, generator=g, dtype=torch.float64) + 0.1,
         "b": torch.rand(2, generator=g, dtype=torch.float64) + 0.1}
    calls = []

    def matvec(v):
        calls.append(1)
        out = H @ torch.cat([v["a"], v["b"]])
        return {"a": out[:3], "b": out[3:]}

    return H, b, d, matvec, calls


def test_solution_is_alpha_d_b_and_spends_no_matvec():
    H, b, d, matvec, calls = _problem()
    res = hg.sama(matvec, b, alpha=0.3, preconditioner=d)
    for k in b:
        torch.testing.assert_close(res.solution[k], 0.3 * (d[k] * b[k]), rtol=0, atol=0)
    assert not calls and int(res.iterations) == 0
    assert bool(torch.isnan(res.residual_norm)) and not bool(res.converged)
    assert res.stats["residual_estimate"] is True


def test_true_residual_at_one_matvec_equals_one_term_neumann():
    H, b, d, matvec, calls = _problem()
    res = hg.sama(matvec, b, alpha=0.05, preconditioner=d, residual=True)
    ref = hg.neumann(matvec, b, iterations=1, alpha=0.05, preconditioner=d)
    assert len(calls) == 2 and int(res.iterations) == 1
    for k in b:
        torch.testing.assert_close(res.solution[k], ref.solution[k])
    x = torch.cat([res.solution["a"], res.solution["b"]])
    bv = torch.cat([b["a"], b["b"]])
    direct = (bv - H @ x).norm() / bv.norm()  # dense, not from the solver
    torch.testing.assert_close(res.residual_norm, direct)
    torch.testing.assert_close(res.residual_norm, ref.residual_norm)
    assert res.stats["residual_estimate"] is False


def test_exact_when_alpha_d_is_the_inverse_hessian():
    H = torch.diag(torch.tensor([2.0, 5.0, 10.0], dtype=torch.float64))
    b = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    res = hg.sama(lambda v: H @ v, b, alpha=2.0, preconditioner=0.5 / torch.diag(H),
                  residual=True)
    torch.testing.assert_close(res.solution, torch.linalg.solve(H, b))
    assert float(res.residual_norm) < 1e-15 and bool(res.converged)


def test_with_adam_preconditioner_is_one_adam_step_response():
    # One more Adam step (no momentum, lr) from w: w' = w - lr D (H w - c); dw'/dc = lr D.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        (w ** 4).sum().backward()
        opt.step()
    D = hg.adam_preconditioner(opt, {"w": w})
    b = {"w": torch.ones(4, dtype=torch.float64)}
    res = hg.sama(lambda v: v, b, alpha=0.01, preconditioner=D)
    torch.testing.assert_close(res.solution["w"], 0.01 * D["w"])
    v_hat = opt.state[w]["exp_avg_sq"] / (1 - 0.999 ** 3)
    torch.testing.assert_close(res.solution["w"], 0.01 / (v_hat.sqrt() + 1e-8))


def test_zero_rhs_and_bad_input():
    H, b, d, matvec, _ = _problem()
    zero = tree.zeros_like(b)
    res = hg.sama(matvec, zero, residual=True)
    assert float(res.residual_norm) == 0.0 and bool(res.converged)
    with pytest.raises(ValueError, match="`alpha` must be a finite number > 0"):
        hg.sama(matvec, b, alpha=0.0)
    with pytest.raises(ValueError, match="`preconditioner` entries must be finite and > 0"):
        hg.sama(matvec, b, preconditioner=tree.scale(d, -1.0))
    with pytest.raises(ValueError, match="same structure"):
        hg.sama(matvec, b, preconditioner={"a": d["a"]})
    with pytest.raises(TypeError, match="`residual` must be a bool"):
        hg.sama(matvec, b, residual=1)


def test_docstring_examples():
    res = doctest.testmod(sama_module, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 2 and res.failed == 0
