"""The Adam-preconditioned IFT solves of the synthetic tasks: the library's series with
``adam_preconditioner`` (Adam without momentum) and tasks/synthetic/precond.py's heavy ball
(Adam with momentum)."""

from __future__ import annotations

import torch

import hypergrad as hg
from tasks.synthetic.precond import adam_heavy_ball


def _problem(n: int = 6):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    b = {"w": torch.randn(n, generator=g, dtype=torch.float64)}
    return h, b, (lambda v: {"w": h @ v["w"]})


def _adam(p: torch.Tensor, lr: float, steps: int = 0) -> torch.optim.Adam:
    opt = torch.optim.Adam([p], lr=lr)
    for _ in range(steps):  # populate exp_avg_sq with uneven per-coordinate scales
        opt.zero_grad()
        p.grad = torch.linspace(0.5, 3.0, len(p), dtype=torch.float64)
        opt.step()
    return opt


def test_without_adam_state_it_is_plain_neumann():
    h, b, mv = _problem()
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    d = hg.adam_preconditioner(_adam(p, 0.1), {"w": p})
    ours = hg.neumann(mv, b, iterations=7, alpha=0.1, preconditioner=d)
    ref = hg.neumann(mv, b, iterations=7, alpha=0.1)
    torch.testing.assert_close(ours.solution["w"], ref.solution["w"])
    torch.testing.assert_close(ours.residual_norm, ref.residual_norm)


def test_with_adam_state_it_solves_the_system():
    h, b, mv = _problem()
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    d = hg.adam_preconditioner(_adam(p, 0.1, steps=20), {"w": p})
    assert d["w"].max() / d["w"].min() > 5  # really preconditioned
    res = hg.neumann(mv, b, iterations=2000, alpha=0.1, preconditioner=d)
    torch.testing.assert_close(res.solution["w"], torch.linalg.solve(h, b["w"]), rtol=1e-6,
                               atol=1e-8)
    r = torch.linalg.norm(b["w"] - h @ res.solution["w"]) / torch.linalg.norm(b["w"])
    torch.testing.assert_close(res.residual_norm, r, rtol=1e-6, atol=1e-12)
    hb = adam_heavy_ball(mv, b, preconditioner=d, alpha=0.1, iterations=3000)
    torch.testing.assert_close(hb.solution["w"], torch.linalg.solve(h, b["w"]), rtol=1e-6,
                               atol=1e-8)


def test_heavy_ball_converges_where_plain_series_diverges():
    h, b, mv = _problem()
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    d = hg.adam_preconditioner(_adam(p, 1.0), {"w": p})  # no Adam state: D = lr I = 1
    lam = torch.linalg.eigvalsh(h).max()
    assert lam > 2  # the plain series diverges beyond 2 / lambda_max ...
    plain = hg.neumann(mv, b, iterations=50, alpha=1.0, preconditioner=d)
    assert not plain.residual_norm < 1
    hb = adam_heavy_ball(mv, b, preconditioner=d, alpha=1.0, iterations=3000)
    assert lam < 2 * 1.9 / 0.1  # ... heavy ball (beta1 = 0.9) converges up to D H < 38
    torch.testing.assert_close(hb.solution["w"], torch.linalg.solve(h, b["w"]), rtol=1e-6,
                               atol=1e-8)
    r = torch.linalg.norm(b["w"] - h @ hb.solution["w"]) / torch.linalg.norm(b["w"])
    torch.testing.assert_close(hb.residual_norm, r, rtol=1e-6, atol=1e-12)


def test_solver_for_ift_maps_names_to_solvers_and_trainer_options():
    import pytest

    from tasks.synthetic.precond import solver_for_ift

    h, b, mv = _problem()
    solver, extra = solver_for_ift("neumann", 7, 0.01, alpha_scale=10.0)
    assert extra == {}
    ref = hg.neumann(mv, b, iterations=7, alpha=0.1)
    torch.testing.assert_close(solver(mv, b).solution["w"], ref.solution["w"])
    for name in ("library_adam", "adam_neumann", "adam_momentum"):
        assert solver_for_ift(name, 3, 0.1)[1] == {"ift_preconditioner": "adam"}
    d = {"w": torch.full((6,), 0.5, dtype=torch.float64)}
    hb, _ = solver_for_ift("adam_momentum", 50, 0.1)
    torch.testing.assert_close(
        hb(mv, b, preconditioner=d).solution["w"],
        adam_heavy_ball(mv, b, preconditioner=d, alpha=0.1, iterations=50).solution["w"])
    with pytest.raises(ValueError, match="`ift` must be one of"):
        solver_for_ift("cg", 3, 0.1)
    with pytest.raises(TypeError, match="dict-shaped"):
        adam_heavy_ball(lambda v: v, torch.ones(3), preconditioner=torch.ones(3), alpha=0.1)
