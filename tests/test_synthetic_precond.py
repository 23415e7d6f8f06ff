"""The Adam-preconditioned Neumann series of tasks/synthetic/precond.py."""

from __future__ import annotations

import types

import torch

import hypergrad as hg
from tasks.synthetic.precond import AdamPreconditionedNeumann


def _problem(n: int = 6):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    b = {"w": torch.randn(n, generator=g, dtype=torch.float64)}
    return h, b, (lambda v: {"w": h @ v["w"]})


def _trainer(p: torch.Tensor, lr: float):
    opt = torch.optim.Adam([p], lr=lr)
    return types.SimpleNamespace(pt_opt=opt, pt_params={"w": p})


def test_without_adam_state_it_is_plain_neumann():
    h, b, mv = _problem()
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    solver = AdamPreconditionedNeumann(iterations=7).bind(_trainer(p, 0.1))
    ours = solver(mv, b)
    ref = hg.neumann(mv, b, iterations=7, alpha=0.1)
    torch.testing.assert_close(ours.solution["w"], ref.solution["w"])
    torch.testing.assert_close(ours.residual_norm, ref.residual_norm)


def test_with_adam_state_it_solves_the_system():
    h, b, mv = _problem()
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    tr = _trainer(p, 0.1)
    for _ in range(20):  # populate exp_avg_sq with uneven per-coordinate scales
        tr.pt_opt.zero_grad()
        p.grad = torch.linspace(0.5, 3.0, 6, dtype=torch.float64)
        tr.pt_opt.step()
    solver = AdamPreconditionedNeumann(iterations=2000).bind(tr)
    d = solver.diagonal()["w"]
    assert d.max() / d.min() > 5  # really preconditioned
    res = solver(mv, b)
    torch.testing.assert_close(res.solution["w"], torch.linalg.solve(h, b["w"]), rtol=1e-6,
                               atol=1e-8)
    r = torch.linalg.norm(b["w"] - h @ res.solution["w"]) / torch.linalg.norm(b["w"])
    torch.testing.assert_close(res.residual_norm, r, rtol=1e-6, atol=1e-12)


def test_heavy_ball_converges_where_plain_series_diverges():
    h, b, mv = _problem()
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    tr = _trainer(p, 1.0)  # no Adam state: D = lr I = 1, beyond 2 / lambda_max
    lam = torch.linalg.eigvalsh(h).max()
    assert lam > 2  # the plain series diverges ...
    plain = AdamPreconditionedNeumann(iterations=50).bind(tr)(mv, b)
    assert not plain.residual_norm < 1
    hb = AdamPreconditionedNeumann(iterations=3000, momentum=True).bind(tr)(mv, b)
    assert lam < 2 * 1.9 / 0.1  # ... heavy ball (beta1 = 0.9) converges up to D H < 38
    torch.testing.assert_close(hb.solution["w"], torch.linalg.solve(h, b["w"]), rtol=1e-6,
                               atol=1e-8)
