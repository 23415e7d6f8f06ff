"""torch.compile: the first-order pieces (the loss and its gradient) may be compiled.

A compiled loss has no double backward (AOTAutograd: "torch.compile with aot_autograd does not
currently support double backward"), so exact products fail on it, or worse, silently return
zeros when the hyperparameters' path is not connected through the compiled backward. The
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


def test_exact_products_on_a_compiled_loss_cannot_be_trusted_fd_ones_can():
    inner, outer, params, hparams = _problem(torch.float64)
    compiled_inner = torch.compile(inner, backend="aot_eager", fullgraph=True)
    v = tree.map(torch.ones_like, params)
    with pytest.raises(RuntimeError, match="double backward"):
        hg.hvp(compiled_inner, params, v, hparams)
    right = hg.mixed_vjp(inner, params, hparams, v)  # eager, exact
    assert _rel(hg.fd_mixed_vjp(compiled_inner, params, hparams, v), right) < 1e-6
    # The exact mixed product reaches hparams through no differentiable path of the compiled
    # backward. torch 2.13 then returns no gradient and the product reads as zero (measured);
    # a clear error would be the fix. Either way it is not the right answer.
    try:
        wrong = hg.mixed_vjp(compiled_inner, params, hparams, v)
    except RuntimeError:
        return
    assert _rel(wrong, right) > 0.5


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
