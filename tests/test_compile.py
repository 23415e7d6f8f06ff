"""torch.compile: the first-order pieces (the loss and its gradient) may be compiled.

A compiled loss has no double backward (AOTAutograd: "torch.compile with aot_autograd does not
currently support double backward"), so torch's exact products fail on it, or worse, silently
return zeros when the hyperparameters' path is not connected through the compiled backward;
hypergrad finds the compiled region in the gradient's graph and raises DoubleBackwardError
instead (every second-order function: products, IFT, forward mode, unroll steps). The
finite-difference path takes only first-order gradients, so it runs with a compiled loss and
gives the eager hypergradient. The fast tests use the ``aot_eager`` backend (AOTAutograd
without code generation: the same autograd behaviour in ~1 s); the ``inductor`` test compiles
C++ kernels with gcc (over a minute on this machine) and is marked slow.
"""

from __future__ import annotations

import functools
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import hypergrad as hg
from hypergrad import tree


def _problem(dtype):
    """A tanh MLP with per-example loss weights; data drawn in float64, then cast to ``dtype``;
    ``params`` a near-optimum of the inner problem (L-BFGS in float64), so CG converges."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    xv = torch.randn(48, 6, generator=g, dtype=torch.float64)
    yv = torch.randint(0, 3, (48,), generator=g)
    params = {"w1": 0.5 * torch.randn(6, 12, generator=g, dtype=torch.float64),
              "w2": 0.5 * torch.randn(12, 3, generator=g, dtype=torch.float64)}
    hparams = 0.3 * torch.randn(48, generator=g, dtype=torch.float64)

    def make(xt, xvt):
        def inner(p, h):
            out = torch.tanh(xt @ p["w1"]) @ p["w2"]
            ce = F.cross_entropy(out, y, reduction="none")
            reg = (p["w1"] ** 2).sum() + (p["w2"] ** 2).sum()
            return (2 * torch.sigmoid(h) * ce).mean() + 0.05 * reg

        def outer(p, h):
            return F.cross_entropy(torch.tanh(xvt @ p["w1"]) @ p["w2"], yv)

        return inner, outer

    inner64, _ = make(x, xv)
    p = tree.detach(params, requires_grad=True)
    opt = torch.optim.LBFGS(list(p.values()), max_iter=200, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10)

    def closure():
        opt.zero_grad()
        loss = inner64(p, hparams)
        loss.backward()
        return loss

    opt.step(closure)
    inner, outer = make(x.to(dtype), xv.to(dtype))
    return inner, outer, tree.map(lambda t: t.detach().to(dtype), p), hparams.to(dtype)


def _fd_hypergradient(inner, outer, params, hparams):
    """implicit_grad with finite-difference products and CG to the products' accuracy."""
    tol = 1e-7 if hparams.dtype == torch.float64 else 1e-3  # ~ sqrt(u) of the products
    grad, info = hg.implicit_grad(inner, outer, params, hparams, products="finite_difference",
                                  solver=functools.partial(hg.cg, maxiter=100, tol=tol),
                                  return_info=True, on_failure="raise")
    assert bool(info["solve"].converged)
    return grad


def _rel(a, b) -> float:
    return float(tree.norm(tree.sub(a, b)) / tree.norm(b))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


def test_fd_hypergradient_with_compiled_inner_loss_matches_eager():
    inner, outer, params, hparams = _problem(torch.float64)
    exact = hg.implicit_grad(inner, outer, params, hparams,
                             solver=functools.partial(hg.cg, maxiter=100, tol=1e-10))
    eager = _fd_hypergradient(inner, outer, params, hparams)
    compiled_inner = torch.compile(inner, backend="aot_eager", fullgraph=True)
    compiled = _fd_hypergradient(compiled_inner, outer, params, hparams)
    assert _rel(compiled, eager) < 1e-10  # the same first-order arithmetic
    assert _rel(compiled, exact) < 1e-6  # and the right hypergradient


def test_exact_products_on_a_compiled_loss_raise_fd_ones_work():
    inner, outer, params, hparams = _problem(torch.float64)
    compiled_inner = torch.compile(inner, backend="aot_eager", fullgraph=True)
    v = tree.map(torch.ones_like, params)
    right = hg.mixed_vjp(inner, params, hparams, v)  # eager, exact
    assert _rel(hg.fd_mixed_vjp(compiled_inner, params, hparams, v), right) < 1e-6
    # torch's mixed product reaches hparams through no node of the compiled backward and reads
    # as zero (measured, torch 2.13); hypergrad sees the compiled region in the gradient's graph
    with pytest.raises(hg.DoubleBackwardError, match='finite_difference.*fd_mixed_vjp'):
        hg.mixed_vjp(compiled_inner, params, hparams, v)
    for call in (lambda: hg.hvp(compiled_inner, params, v, hparams),
                 lambda: hg.make_hvp(compiled_inner, params, hparams),
                 lambda: hg.HessianOperator(compiled_inner, params, hparams, ()),
                 lambda: hg.implicit_grad(compiled_inner, outer, params, hparams),
                 lambda: hg.stochastic_hvp(lambda p, h, b: compiled_inner(p, h), params,
                                           hparams, iter([0]))(v)):
        with pytest.raises(hg.DoubleBackwardError, match="torch.compile"):
            call()


def test_a_compiled_part_of_an_eager_loss_raises_and_an_eager_zero_stays_zero():
    inner, _, params, hparams = _problem(torch.float64)
    v = tree.map(torch.ones_like, params)
    squash = torch.compile(lambda w, h: (torch.sigmoid(h).sum() * torch.tanh(w) ** 2).sum(),
                           backend="aot_eager", fullgraph=True)

    def mixed(p, h):  # eager, with one compiled term that carries part of the h-dependence
        return inner(p, h) + squash(p["w1"], h)

    with pytest.raises(hg.DoubleBackwardError):
        hg.mixed_vjp(mixed, params, hparams, v)
    # the trap: a gradient that genuinely does not depend on hparams is zero, not an error,
    # also after torch.compile has run in this process (the graph is searched, not the result)
    eager = lambda p, h: (p["w1"] ** 2).sum() + h.sum() * 3.0  # noqa: E731
    out = hg.mixed_vjp(eager, params, hparams, v)
    assert torch.equal(out, torch.zeros_like(hparams))


def test_second_order_forms_reject_a_compiled_loss():
    """Forward mode and unroll steps differentiate the inner gradient too: the same error."""
    import torchopt

    inner, outer, params, hparams = _problem(torch.float64)
    compiled_inner = torch.compile(inner, backend="aot_eager", fullgraph=True)
    h = hparams.clone().requires_grad_(True)
    u = torch.ones_like(hparams)
    calls = {
        "gradient_step": lambda: hg.unroll(hg.gradient_step(compiled_inner, 0.1), params, h, 2),
        "optimizer_step": lambda: hg.unroll(
            hg.optimizer_step(compiled_inner, torchopt.adam(1e-2)),
            (params, torchopt.adam(1e-2).init(params)), h, 2),
        "implicit_jvp": lambda: hg.implicit_jvp(compiled_inner, params, hparams, u),
        "implicit_jacobian": lambda: hg.implicit_jacobian(compiled_inner, params, hparams),
        "forward_hypergrad": lambda: hg.forward_hypergrad(
            hg.gradient_step(compiled_inner, 0.1), params, hparams, 2,
            lambda p, h: outer(p, h)),
    }
    for name, call in calls.items():
        with pytest.raises(hg.DoubleBackwardError, match="torch.compile"):
            call()
            pytest.fail(name)
    # the eager loss: the unrolled hypergradient is unchanged (no false alarm)
    p = hg.unroll(hg.gradient_step(inner, 0.1), params, h, 2)
    (g,) = torch.autograd.grad(outer(p, h), h)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_a_compiled_fixed_point_map_works_first_order_only():
    """fixed_point_grad / fixed_point_solution take only vector-Jacobian products of the map:
    a compiled map gives the eager hypergradient (the compile table in docs/first-order.md)."""
    g = torch.Generator().manual_seed(0)
    W = 0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64) / 6 ** 0.5
    h = torch.randn(6, generator=g, dtype=torch.float64)
    T = lambda x, h: torch.tanh(W @ x + h)  # noqa: E731  (a contraction)
    L = lambda x, h: (x ** 3).sum()  # noqa: E731
    x = torch.zeros(6, dtype=torch.float64)
    for _ in range(200):
        x = T(x, h)
    compiled = torch.compile(T, backend="aot_eager", fullgraph=True)
    eager = hg.fixed_point_grad(T, L, x, h)
    assert _rel(hg.fixed_point_grad(compiled, L, x, h), eager) < 1e-12
    hq = h.clone().requires_grad_(True)
    L(hg.fixed_point_solution(compiled, x, hq), hq).backward()
    assert _rel(hq.grad, eager) < 1e-12


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="inductor needs a C++ compiler")
def test_inductor_compiled_inner_loss_fd_matches_eager_float32():
    inner64, outer64, params64, hparams64 = _problem(torch.float64)
    ref = _fd_hypergradient(inner64, outer64, params64, hparams64)
    inner, outer, params, hparams = _problem(torch.float32)
    eager = _fd_hypergradient(inner, outer, params, hparams)
    compiled = _fd_hypergradient(torch.compile(inner), outer, params, hparams)
    assert _rel(compiled, eager) < 1e-2  # fused kernels round differently; FD divides by 2ε
    assert _rel(compiled.double(), ref) < 2e-2
