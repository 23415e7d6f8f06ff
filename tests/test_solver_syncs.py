"""Host synchronisations per solve, counted by intercepting every tensor -> Python conversion.

On a GPU each ``bool(t)``, ``float(t)``, ``int(t)``, ``t.item()``, ``t.tolist()`` makes the host
wait for the device. The counts documented in ``hypergrad.solvers`` are checked here on CPU:
Neumann reads nothing; cg/minres/gmres read once per stopping test (one per iteration, or per
``check_every`` iterations for cg) plus one.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import hypergrad as hg

D = torch.float64
_NAMES = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@contextlib.contextmanager
def count_syncs():
    """Count tensor -> Python conversions inside the block (restores the methods after)."""
    counts = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in _NAMES}

    def wrap(orig):
        def counted(self, *args, **kwargs):
            counts["n"] += 1
            return orig(self, *args, **kwargs)
        return counted

    try:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, wrap(orig))
        yield counts
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)


def _problem(n: int = 20, seed: int = 0, cond: float = 100.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    A = (q * torch.logspace(0, math.log10(cond), n, dtype=D)) @ q.T
    return A, torch.randn(n, generator=g, dtype=D)


def test_the_counter_sees_conversions_and_restores_the_methods():
    t = torch.ones(())
    with count_syncs() as c:
        bool(t), float(t), int(t), t.item(), t.tolist()
    assert c["n"] == 5
    assert torch.Tensor.__bool__ is not None and bool(t) is True
    with count_syncs() as c:
        pass
    assert c["n"] == 0


@pytest.mark.parametrize("kw", [
    dict(iterations=7, alpha=0.01),
    dict(iterations=7, alpha="auto", power_iterations=5),
    dict(iterations=7, alpha=0.01, exact_residual=True),
    dict(iterations=7, alpha=0.01, damping=0.1),
    dict(iterations=0, alpha=0.01),
])
def test_neumann_makes_no_host_sync(kw):
    A, b = _problem()
    x0 = torch.linalg.solve(A, b) + 0.1
    for extra in ({}, {"x0": x0}):
        with count_syncs() as c:
            res = hg.neumann(lambda v: A @ v, b, **kw, **extra)
        assert c["n"] == 0, (kw, extra)
        assert torch.isfinite(res.residual_norm)


def test_neumann_with_a_preconditioner_makes_one_sync_to_validate_it():
    A, b = _problem()
    with count_syncs() as c:
        hg.neumann(lambda v: A @ v, b, iterations=5, alpha=0.01,
                   preconditioner=torch.full((20,), 0.5, dtype=D))
    assert c["n"] == 1


def test_neumann_on_a_pytree_with_diverging_alpha_makes_no_host_sync():
    A, b = _problem()

    def mv(t):
        y = A @ torch.cat([t["a"], t["b"]])
        return {"a": y[:5], "b": y[5:]}

    with count_syncs() as c:
        res = hg.neumann(mv, {"a": b[:5], "b": b[5:]}, iterations=400, alpha=10.0)
    assert c["n"] == 0
    assert math.isinf(float(res.residual_norm)) and hg.tree.all_finite(res.solution)


@pytest.mark.parametrize("every", [1, 3, 4])
@pytest.mark.parametrize("maxiter", [5, 200])
def test_cg_reads_once_per_check_every_iterations_plus_one(every, maxiter):
    A, b = _problem()
    with count_syncs() as c:
        res = hg.cg(lambda v: A @ v, b, maxiter=maxiter, check_every=every)
    m = res.stats["matvecs"] - int(res.stats["residual_checked"])  # loop matvecs
    expected = m // every + 1 + (1 if m == maxiter and m % every else 0)
    assert c["n"] == expected, (c["n"], m, res)
    if every == 1:
        assert c["n"] == int(res.iterations) - int(res.stats["residual_checked"]) + 1


def test_cg_pytree_path_and_x0_read_once_per_iteration_plus_one():
    A, b = _problem()

    def mv(t):
        y = A @ torch.cat([t["a"], t["b"]])
        return {"a": y[:5], "b": y[5:]}

    bt = {"a": b[:5], "b": b[5:]}
    x0 = {"a": torch.zeros(5, dtype=D) + 0.1, "b": torch.zeros(15, dtype=D)}
    with count_syncs() as c:
        res = hg.cg(mv, bt, x0=x0)
    steps = int(res.iterations) - 1 - int(res.stats["residual_checked"])
    assert bool(res.converged) and c["n"] == steps + 1


@pytest.mark.parametrize("name", ["minres", "gmres"])
def test_krylov_solvers_read_once_per_matvec_plus_one(name):
    A, b = _problem()
    with count_syncs() as c:
        res = getattr(hg, name)(lambda v: A @ v, b, maxiter=200)
    matvecs = int(res.iterations) - int(res.stats["residual_checked"])
    assert bool(res.converged) and c["n"] == matvecs + 1


def test_gmres_with_restarts_and_x0_reads_once_per_matvec_plus_one():
    A, b = _problem(seed=3, cond=5.0)
    A = A + 0.2 * torch.triu(A, 1)  # non-symmetric
    with count_syncs() as c:
        res = hg.gmres(lambda v: A @ v, b, maxiter=200, restart=4, x0=torch.ones(20, dtype=D))
    matvecs = int(res.iterations) - int(res.stats["residual_checked"]) - 1  # minus x0's
    assert bool(res.converged) and int(res.iterations) > 6  # it restarted
    assert c["n"] == matvecs + 1


def test_normal_cg_reads_as_its_inner_cg():
    A, b = _problem(cond=10.0)
    with count_syncs() as c:
        res = hg.normal_cg(lambda v: A @ v, b, maxiter=200)
    inner_matvecs = (int(res.iterations) - 2) // 2
    assert c["n"] <= inner_matvecs + 1


def test_nystrom_makes_no_host_sync_from_python():
    A, b = _problem()
    with count_syncs() as c:
        hg.nystrom(lambda v: A @ v, b, rank=5)
    assert c["n"] == 0


def test_power_iteration_reads_once_to_validate_v0():
    A, b = _problem()
    with count_syncs() as c:
        lam, used = hg.power_iteration(lambda v: A @ v, b, iterations=30)
    assert c["n"] == 1 and used == 30
