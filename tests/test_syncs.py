"""Host synchronisations per call, counted by patching the tensor methods that read a value.

On a GPU each ``bool(t)``, ``float(t)``, ``int(t)``, ``t.item()`` or ``t.tolist()`` waits for
every queued kernel. The library reads its health signals once per call (one ``tolist`` of a
stacked vector) and never per product; these tests count the reads on CPU tensors, where the
same code paths run (issue 13.8).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import pytest
import torch

import hypergrad as hg
from hypergrad import testing
from hypergrad.implicit import _implicit_solution_fast

_READS = ("__bool__", "__float__", "__int__", "item", "tolist")


@contextlib.contextmanager
def count_syncs(skip_optim: bool = False):
    """Count calls of the value-reading tensor methods inside the block; with ``skip_optim``
    not those made by torch.optim (Adam keeps its step counter on the CPU: no device sync)."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def patched(name):
        original = saved[name]

        def read(self, *args, **kwargs):
            where = sys._getframe(1).f_code.co_filename
            if not (skip_optim and f"torch{os.sep}optim" in where):
                calls.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in _READS:
        setattr(torch.Tensor, name, patched(name))
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def richardson(matvec, b, iterations=10, alpha=0.05):
    """A fixed-iteration solver that reads nothing: x_{k+1} = x_k + alpha (b - H x_k)."""
    x = hg.tree.zeros_like(b)
    for _ in range(iterations):
        x = hg.tree.axpy(alpha, hg.tree.sub(b, matvec(x)), x)
    r = hg.tree.norm(hg.tree.sub(b, matvec(x))) / hg.tree.norm(b)
    return hg.SolveResult(x, torch.tensor(iterations + 1), r, r <= 1e-6,
                          {"nonpositive_curvature": torch.tensor(False)})


def _problem():
    return testing.quadratic_problem(seed=0, n_params=6, n_hparams=3, cond=5.0)


def _solver_syncs(solver, prob) -> int:
    """Reads the solver makes by itself on the IFT's own right-hand side."""
    op = hg.HessianOperator(prob.inner_loss, prob.params, prob.hparams, ())
    b = torch.func.grad(prob.outer_loss)(prob.params, prob.hparams)
    with count_syncs() as calls:
        solver(op, b)
    return len(calls)


def test_counter_counts_each_kind_of_read():
    t = torch.tensor([1.0, 2.0])
    with count_syncs() as calls:
        bool(t[0] > 0), float(t[0]), int(t[1]), t.sum().item(), t.tolist()
    assert calls == list(_READS)


def test_implicit_grad_reads_once_with_a_solver_that_reads_nothing():
    prob = _problem()
    with count_syncs() as calls:
        g = hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                             solver=functools.partial(richardson, iterations=200, alpha=0.1))
    assert calls == ["tolist"]  # the one health read
    assert testing.compare(g, prob.hypergrad).rel_error < 1e-6


@pytest.mark.parametrize("solver", [
    functools.partial(richardson, iterations=200, alpha=0.1),
    hg.sama,
], ids=["richardson", "sama"])
@pytest.mark.parametrize("stationarity_tol", [1e-3, None])
def test_implicit_grad_with_finite_differences_reads_once_like_the_exact_path(
        solver, stationarity_tol):
    """The FD operator is built without re-validation (it used to read params and hparams once
    each) and its health signals are the products' own gradients: the one health read."""
    prob = _problem()
    with count_syncs() as calls:
        g = hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                             solver=solver, products="finite_difference", on_failure="ignore",
                             stationarity_tol=stationarity_tol)
    assert calls == ["tolist"]
    if solver is not hg.sama:
        assert testing.compare(g, prob.hypergrad).rel_error < 1e-6
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    p = hg.implicit_solution(prob.inner_loss, prob.params, h, solver=solver,
                             products="finite_difference", on_failure="ignore",
                             stationarity_tol=stationarity_tol)
    loss = prob.outer_loss(p, h)
    with count_syncs() as backward:
        loss.backward()
    assert backward == ["tolist"]


def test_adam_preconditioner_reads_the_step_counts_once():
    ws = [torch.ones(3, requires_grad=True) for _ in range(4)]
    opt = torch.optim.Adam(ws, lr=0.1)
    sum((w * (i + 1)).sum() for i, w in enumerate(ws)).backward()
    opt.step()
    with count_syncs() as calls:
        d = hg.adam_preconditioner(opt, {str(i): w for i, w in enumerate(ws)})
    assert calls == ["tolist"]  # one per leaf before
    for i in range(4):  # v_hat = g^2 after one step: D = 1 / (|g| + eps)
        torch.testing.assert_close(d[str(i)], torch.full((3,), 1.0 / (i + 1 + 1e-8)))


@pytest.mark.parametrize("solver", [
    functools.partial(hg.neumann, iterations=5, alpha=0.05),
    functools.partial(hg.cg, maxiter=20),
], ids=["neumann-fixed-alpha", "cg"])
def test_implicit_grad_adds_exactly_one_read_to_the_solver(solver):
    """implicit_grad's own cost is one read, whatever the solver reads to decide when to stop.
    With a sync-free Neumann series (fixed alpha) the total is 1; CG reads once per stopping
    test (see the report printed with -s)."""
    prob = _problem()
    own = _solver_syncs(solver, prob)
    with count_syncs() as calls:
        hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams,
                         solver=solver, on_failure="ignore")
    print(f"host reads per implicit_grad: {len(calls)} (solver {own}, implicit_grad 1)")
    assert len(calls) == own + 1


def test_implicit_solution_reads_once_in_forward_and_once_in_backward():
    prob = _problem()
    solver = functools.partial(richardson, iterations=200, alpha=0.1)
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    with count_syncs() as forward:
        p = hg.implicit_solution(prob.inner_loss, prob.params, h, solver=solver)
    loss = prob.outer_loss(p, h)
    with count_syncs() as backward:
        loss.backward()
    assert forward == ["tolist"] and backward == ["tolist"]
    # the internal fast path (pretraining) skips the forward's validation read
    h2 = hg.tree.detach(prob.hparams, requires_grad=True)
    with count_syncs() as fast:
        p = _implicit_solution_fast(prob.inner_loss, prob.params, h2, solver=solver)
    assert fast == []
    prob.outer_loss(p, h2).backward()
    torch.testing.assert_close(h2["h"].grad, h["h"].grad)


def test_make_hvp_checks_once_and_its_products_never_read():
    prob = _problem()
    with count_syncs() as build:
        op = hg.make_hvp(prob.inner_loss, prob.params, prob.hparams)
    v = hg.tree.map(torch.ones_like, prob.params)
    with count_syncs() as products:
        for _ in range(10):
            v = op(v)
    assert build == ["tolist"] and products == []
    with count_syncs() as one_shot:
        hg.hvp(prob.inner_loss, prob.params, v, prob.hparams)
    assert one_shot == ["tolist"]


@pytest.mark.parametrize("truncate, checkpoint_every", [(None, None), (5, None), (None, 4)])
def test_unroll_reads_once_whatever_its_length(truncate, checkpoint_every):
    prob = _problem()
    step = hg.gradient_step(prob.inner_loss, lr=0.01)
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    for steps in (10, 40):
        with count_syncs() as calls:
            hg.unroll(step, prob.params, h, steps, truncate=truncate,
                      checkpoint_every=checkpoint_every)
        assert calls == ["tolist"], steps


def test_functional_implicit_grad_reads_once_outside_transforms_and_never_inside():
    prob = _problem()
    with count_syncs() as calls:
        hg.functional_implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams)
    assert calls == ["tolist"]
    hs = torch.stack([prob.hparams["h"]] * 3)
    with count_syncs() as calls:
        torch.func.vmap(lambda h: hg.functional_implicit_grad(
            prob.inner_loss, prob.outer_loss, prob.params, {"h": h}))(hs)
    assert calls == []


def _fixed_point_problem():
    """The gradient-step map of the quadratic problem, ``T(x, h) = x - 0.1 (A x - B h - c)``:
    its fixed point is the inner optimum (dT/dx = I - 0.1 A, spectral radius 0.9 at cond 5)."""
    prob = _problem()
    grad = torch.func.grad(prob.inner_loss)
    T = lambda x, h: hg.tree.axpy(-0.1, grad(x, h), x)  # noqa: E731
    # (I - dT/dx)^T w = b by the series sum_k (dT/dx^T)^k b: no read (fixed alpha)
    return prob, T, functools.partial(hg.neumann, iterations=300, alpha=1.0)


def test_fixed_point_grad_reads_three_times():
    """One read for the NaN/inf check of x and hparams, one for dL/dx, one for the diagnosis
    (converged, fixed-point residual, contraction), with a solver that reads nothing."""
    prob, T, solver = _fixed_point_problem()
    with count_syncs() as calls:
        g = hg.fixed_point_grad(T, prob.outer_loss, prob.params, prob.hparams, solver=solver)
    assert calls == ["tolist"] * 3
    assert testing.compare(g, prob.hypergrad).rel_error < 1e-8


def test_fixed_point_solution_reads_once_forward_and_twice_backward():
    prob, T, solver = _fixed_point_problem()
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    with count_syncs() as forward:
        x = hg.fixed_point_solution(T, prob.params, h, solver=solver)
    loss = prob.outer_loss(x, h)
    with count_syncs() as backward:
        loss.backward()
    assert forward == ["tolist"] and backward == ["tolist"] * 2  # incoming gradient, diagnosis
    assert testing.compare(h["h"].grad, prob.hypergrad["h"]).rel_error < 1e-8


def test_forward_mode_ift_reads_a_fixed_number_of_times():
    """implicit_jvp: entry, tangents, diagnosis; implicit_jacobian: entry and one diagnosis for
    all its stacked solves, however many chunks. Reference: J = A^{-1} B."""
    prob = _problem()
    solver = functools.partial(richardson, iterations=200, alpha=0.1)
    A, B = prob.extras["A"], prob.extras["B"]
    J = torch.linalg.solve(A, B)
    u = {"h": torch.ones(3, dtype=J.dtype)}
    with count_syncs() as calls:
        jv = hg.implicit_jvp(prob.inner_loss, prob.params, prob.hparams, u, solver=solver)
    assert calls == ["tolist"] * 3
    assert testing.compare(jv["x"], J @ u["h"]).rel_error < 1e-6
    for batch_size in (None, 1):  # 1 solve or 3 (one per hparam entry)
        with count_syncs() as calls:
            jac = hg.implicit_jacobian(prob.inner_loss, prob.params, prob.hparams,
                                       solver=solver, batch_size=batch_size)
        assert calls == ["tolist"] * 2, batch_size
        assert testing.compare(jac["x"]["h"], J).rel_error < 1e-6


def test_forward_hypergrad_reads_twice_whatever_its_length_and_step_jvp_once():
    prob = _problem()
    step = hg.gradient_step(prob.inner_loss, lr=0.01)
    for steps in (3, 30):
        with count_syncs() as calls:
            hg.forward_hypergrad(step, prob.params, prob.hparams, steps, prob.outer_loss)
        assert calls == ["tolist", "__bool__"], steps  # entry; finiteness of the result
    z = hg.tree.map(lambda x: torch.zeros(3, *x.shape, dtype=x.dtype), prob.params)
    with count_syncs() as calls:
        hg.step_jvp(step, prob.params, prob.hparams, z, {"h": torch.eye(3, dtype=z["x"].dtype)})
    assert calls == ["tolist"]


# ---- Algorithm 1: one host read per hypergradient and per meta step (issue 17) --------------
def _two_stage(seed: int = 0):
    """A small two-stage problem: a 2-layer encoder, a PT head with per-task weights phi, and an
    FT head on the encoder's features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g)
    y_pt, y_ft = torch.randn(16, 3, generator=g), torch.randn(16, 2, generator=g)
    params = {"enc": 0.3 * torch.randn(4, 5, generator=g),
              "pt": 0.3 * torch.randn(3, 4, generator=g)}
    head = {"w": 0.3 * torch.randn(2, 4, generator=g)}
    hparams = {"logit": torch.zeros(3)}

    def pt_loss(p, h, b):
        per_task = ((torch.tanh(x[b] @ p["enc"].T) @ p["pt"].T - y_pt[b]) ** 2).mean(0)
        return (2 * torch.sigmoid(h["logit"]) * per_task).mean()

    def ft_loss(e, hd, b):
        return ((torch.tanh(x[b] @ e["enc"].T) @ hd["w"].T - y_ft[b]) ** 2).mean()

    return pt_loss, ft_loss, params, head, hparams


@pytest.mark.parametrize("products", ["exact", "finite_difference"])
@pytest.mark.parametrize("head_only", [True, False])
def test_pretraining_hypergrad_reads_once_its_entry_check_included(products, head_only):
    """The finiteness of pt_params, ft_head and hparams rides on the IFT backward's health read."""
    pt_loss, ft_loss, params, head, hparams = _two_stage()
    b = torch.arange(16)
    with count_syncs() as calls:
        res = hg.pretraining_hypergrad(
            lambda p, h: pt_loss(p, h, b), lambda e, hd: ft_loss(e, hd, b),
            lambda e, hd: ft_loss(e, hd, b), params, head, hparams,
            encoder=lambda p: {"enc": p["enc"]}, head_only=head_only, products=products,
            solver=functools.partial(hg.neumann, iterations=3, alpha=0.1))
    assert calls == ["tolist"], calls
    assert res.info["health"]["iterations"] == 2.0  # info is complete after the one read


def test_pretraining_hypergrad_still_names_a_nan_input_first():
    pt_loss, ft_loss, params, head, hparams = _two_stage()
    b = torch.arange(16)
    bad = {**head, "w": head["w"].clone()}
    bad["w"][0, 0] = float("nan")
    for solver in (functools.partial(hg.neumann, iterations=3, alpha=0.1), hg.cg):
        with pytest.raises(ValueError, match=r"`ft_head` leaf 'w' \(shape \(2, 4\)\) contains NaN"):
            hg.pretraining_hypergrad(
                lambda p, h: pt_loss(p, h, b), lambda e, hd: ft_loss(e, hd, b),
                lambda e, hd: ft_loss(e, hd, b), params, bad, hparams,
                encoder=lambda p: {"enc": p["enc"]}, solver=solver)


@pytest.mark.parametrize("products", ["exact", "finite_difference"])
@pytest.mark.parametrize("warm_start", [False, True])
def test_a_meta_step_reads_the_device_exactly_once(products, warm_start):
    """Issue 17's target: every metric of a meta step, the last PT loss and the IFT solve's
    health check in one read; a PT step reads nothing."""
    pt_loss, ft_loss, params, head, hparams = _two_stage()
    tr = hg.MetaPretrainer(pt_loss=pt_loss, ft_loss=ft_loss, pt_params=params, ft_head=head,
                           hparams=hparams, encoder=lambda p: {"enc": p["enc"]}, P=2, K=1,
                           products=products, warm_start=warm_start)
    batch = torch.arange(8)
    tr.run(1, lambda i: batch, lambda j: (batch, batch + 8), progress=False)
    with count_syncs(skip_optim=True) as pt:
        tr.pt_step(batch)
    with count_syncs(skip_optim=True) as meta:
        m = tr.meta_step(batch, batch, batch + 8)
    assert pt == [] and meta == ["tolist"], (pt, meta)
    assert {"val_loss", "hypergrad_norm", "solve_residual"} <= set(m)
    with count_syncs(skip_optim=True) as outer:
        tr.run(2, lambda i: batch, lambda j: (batch, batch + 8), progress=False)
    assert outer == ["tolist"]  # a whole outer iteration, its PT losses included


def test_health_flags_cost_one_sum_and_are_confirmed_exactly():
    """A finiteness flag is a leaf's sum; one that overflows is confirmed with isfinite before it
    is reported, so a finite leaf is never called non-finite (the extra read: failure path)."""
    from hypergrad._checks import Health

    h = Health()
    big = torch.full((8,), 3e38, dtype=torch.float32)  # finite, but its sum overflows
    nan = torch.tensor([1.0, float("nan")])
    h.add_finite("x", [torch.ones(2), big, nan, torch.tensor([float("inf")])])
    with count_syncs() as calls:
        h.read()
    assert h["x"] == [1.0, 1.0, 0.0, 0.0] and h.first_nonfinite("x") == 2
    assert calls.count("tolist") == 1 and len(calls) == 4  # + 3 confirmations, failure path
    ok = Health()
    ok.add_finite("x", [torch.ones(2), torch.zeros(3, dtype=torch.float16)])
    with count_syncs() as calls:
        ok.read()
    assert calls == ["tolist"] and ok.first_nonfinite("x") is None
