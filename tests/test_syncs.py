"""Host synchronisations per call, counted by patching the tensor methods that read a value.

On a GPU each ``bool(t)``, ``float(t)``, ``int(t)``, ``t.item()`` or ``t.tolist()`` waits for
every queued kernel. The library reads its health signals once per call (one ``tolist`` of a
stacked vector) and never per product; these tests count the reads on CPU tensors, where the
same code paths run (issue 13.8).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import hypergrad as hg
from hypergrad import testing
from hypergrad.implicit import _implicit_solution_fast

_READS = ("__bool__", "__float__", "__int__", "item", "tolist")


@contextlib.contextmanager
def count_syncs():
    """Count calls of the value-reading tensor methods inside the block."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def patched(name):
        original = saved[name]

        def read(self, *args, **kwargs):
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
