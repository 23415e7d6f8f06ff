"""FiniteDifferenceOperator: central differences of first-order gradients.

References never come from the operator: closed forms (a quartic whose FD error is known
exactly), dense Hessians and mixed Jacobians from torch.func, and hypergrad's exact
reverse-over-reverse HessianOperator; a custom op and SDPA's flash kernel without a double
backward show that no second-order graph is ever taken.
"""

from __future__ import annotations

import doctest
import functools

import pytest
import torch
import torch.nn.functional as F

import hypergrad as hg
import hypergrad.finite_difference as fdm
from hypergrad import testing, tree


def _rel(a, b) -> float:
    return float(tree.norm(tree.sub(a, b)) / tree.norm(b))


def mlp_problem(dtype=torch.float64, seed=0):
    """A tanh MLP with per-example weights (hparams) on fixed data; a dict of parameters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (32,), generator=g)
    params = {"w1": 0.5 * torch.randn(5, 8, generator=g, dtype=dtype),
              "b1": 0.1 * torch.randn(8, generator=g, dtype=dtype),
              "w2": 0.5 * torch.randn(8, 3, generator=g, dtype=dtype)}
    hparams = {"logits": 0.3 * torch.randn(32, generator=g, dtype=dtype),
               "log_wd": torch.tensor(-3.0, dtype=dtype)}

    def f(p, h):  # the data follow the dtype of the parameters
        out = torch.tanh(x.to(p["w1"].dtype) @ p["w1"] + p["b1"]) @ p["w2"]
        ce = F.cross_entropy(out, y, reduction="none")
        reg = sum((v**2).sum() for v in p.values())
        return (2 * torch.sigmoid(h["logits"]) * ce).mean() + 0.5 * h["log_wd"].exp() * reg

    v = {k: torch.randn(t.shape, generator=g, dtype=dtype) for k, t in params.items()}
    return f, params, hparams, v


# ------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, 5e-3)])
def test_products_match_dense_hessian_and_mixed_jacobian(dtype, tol):
    f, p, h, v = mlp_problem(torch.float64)
    H = testing.dense_hessian(f, p, h)
    M = testing.dense_mixed(f, p, h)
    vv, _ = tree.ravel(v)
    hv_ref, mixed_ref = H @ vv, M.T @ vv
    cast = functools.partial(tree.map, lambda t: t.to(dtype))
    op = hg.FiniteDifferenceOperator(f, cast(p), cast(h), ())
    hv = tree.ravel(op(cast(v)))[0].double()
    mixed = tree.ravel(op.mixed_vjp(cast(v)))[0].double()
    assert hv.dtype == torch.float64
    assert float((hv - hv_ref).norm() / hv_ref.norm()) < tol
    assert float((mixed - mixed_ref).norm() / mixed_ref.norm()) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, 5e-3)])
def test_products_match_exact_hessian_operator(dtype, tol):
    f, p, h, v = mlp_problem(dtype)
    exact = hg.HessianOperator(f, p, h, ())
    op = hg.FiniteDifferenceOperator(f, p, h, ())
    out = op(v)
    assert all(x.dtype == dtype for x in tree.leaves(out))
    assert _rel(out, exact(v)) < tol
    assert _rel(op.mixed_vjp(v), exact.mixed_vjp(v)) < tol
    # .grad and .value are the exact first-order quantities
    assert _rel(op.grad, exact.grad) < 10 * torch.finfo(dtype).eps
    torch.testing.assert_close(op.value, exact.value)


def test_truncation_error_is_order_eps_squared_on_a_quartic():
    # f = sum_i c_i p_i^4 h_i: g = 4 c h p^3, so [g(p + ev) - g(p - ev)] / 2e = 12 c h p^2 v
    # + 4 c h e^2 v^3 exactly; and g_h = c p^4 gives 4 c p^3 v + 4 c p e^2 v^3.
    g = torch.Generator().manual_seed(0)
    c = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    p = torch.randn(6, generator=g, dtype=torch.float64)
    h = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    v = torch.randn(6, generator=g, dtype=torch.float64)

    def f(p, h):
        return (c * h * p**4).sum()

    hv, mixed = 12 * c * h * p**2 * v, 4 * c * p**3 * v
    errors = []
    for eps in (4e-3, 2e-3, 1e-3, 5e-4):
        op = hg.FiniteDifferenceOperator(f, p, h, (), eps=eps)
        e = float(op.step) / float(v.norm())  # the ε of the formula: δ / ||v||
        err_h, err_m = op(v) - hv, op.mixed_vjp(v) - mixed
        torch.testing.assert_close(err_h, 4 * c * h * e**2 * v**3, rtol=1e-4, atol=0)
        torch.testing.assert_close(err_m, 4 * c * p * e**2 * v**3, rtol=1e-4, atol=0)
        errors.append((float(err_h.norm()), float(err_m.norm())))
    for (a, b), (a2, b2) in zip(errors, errors[1:]):  # halving eps quarters the error
        assert 3.9 < a / a2 < 4.1 and 3.9 < b / b2 < 4.1


def test_default_step_follows_the_dtype_and_the_norm_of_params():
    f, p, h, _ = mlp_problem()
    op = hg.FiniteDifferenceOperator(f, p, h, ())
    assert op.eps == pytest.approx(torch.finfo(torch.float64).eps ** 0.5)
    assert float(op.step) == pytest.approx(op.eps * max(1.0, float(tree.norm(p))))
    p32 = tree.map(lambda t: t.float(), p)
    assert hg.FiniteDifferenceOperator(f, p32, None, ()).eps == pytest.approx(
        hg.default_fd_step(torch.float32))
    small = hg.FiniteDifferenceOperator(f, tree.scale(p, 1e-6), h, ())
    assert float(small.step) == pytest.approx(small.eps)  # max(1, ||θ||) floors the scale


def test_relative_error_does_not_depend_on_the_scale_of_v():
    f, p, h, v = mlp_problem()
    op = hg.FiniteDifferenceOperator(f, p, h, ())
    for s in (1e-6, 1e3):
        assert _rel(op(tree.scale(v, s)), tree.scale(op(v), s)) < 1e-7


def test_zero_direction_gives_zero_products_without_nan():
    f, p, h, _ = mlp_problem()
    op = hg.FiniteDifferenceOperator(f, p, h, ())
    zero = tree.zeros_like(p)
    assert all(bool((x == 0).all()) for x in tree.leaves(op(zero)))
    assert all(bool((x == 0).all()) for x in tree.leaves(op.mixed_vjp(zero)))


def test_unused_hparams_and_parameter_free_loss_give_zeros():
    f = lambda p, h: (h["a"] * p**2).sum()  # noqa: E731
    op = hg.FiniteDifferenceOperator(f, torch.ones(3), {"a": torch.ones(3), "b": torch.ones(2)},
                                     ())
    out = op.mixed_vjp(torch.ones(3))
    torch.testing.assert_close(out["b"], torch.zeros(2))
    torch.testing.assert_close(out["a"], torch.full((3,), 2.0), rtol=1e-3, atol=0)
    const = hg.FiniteDifferenceOperator(lambda p: torch.tensor(1.0), torch.ones(2), None, ())
    torch.testing.assert_close(const(torch.ones(2)), torch.zeros(2))


# ------------------------------------------------------------------------ first order only
class _TanhBackward(torch.autograd.Function):
    """The backward of ``_Tanh``; its own derivative is "not implemented" (like a fused kernel's
    backward, e.g. SDPA's flash attention on CPU)."""

    @staticmethod
    def forward(ctx, grad, y):
        return grad * (1 - y * y)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("derivative for tanh_kernel_backward is not implemented")


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _TanhBackward.apply(grad, y)


def test_never_takes_a_double_backward():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    t = torch.randn(20, generator=g, dtype=torch.float64)

    def make(act):
        def f(w, h):
            return ((act(x @ w) - t) ** 2).mean() + 0.5 * (h.exp() * w**2).sum()
        return f

    w = torch.randn(4, generator=g, dtype=torch.float64)
    h = torch.zeros(4, dtype=torch.float64)
    v = torch.randn(4, generator=g, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="not implemented"):
        hg.HessianOperator(make(_Tanh.apply), w, h, ())(v)
    op = hg.FiniteDifferenceOperator(make(_Tanh.apply), w, h, ())
    exact = hg.HessianOperator(make(torch.tanh), w, h, ())
    assert _rel(op(v), exact(v)) < 1e-7
    assert _rel(op.mixed_vjp(v), exact.mixed_vjp(v)) < 1e-7


def test_scaled_dot_product_attention_default_kernel():
    # 4-d inputs take the fused CPU kernel, whose backward has no derivative in torch.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64)
    wq = 0.5 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    v = torch.randn(4, 4, generator=g, dtype=torch.float64)

    def f(w):
        return F.scaled_dot_product_attention(x @ w, x, x).square().mean()

    with pytest.raises(RuntimeError, match="not implemented"):
        hg.hvp(f, wq, v)
    with sdpa_kernel(SDPBackend.MATH):
        ref = hg.hvp(f, wq, v)
    assert _rel(hg.fd_hvp(f, wq, v), ref) < 1e-6


def test_products_build_no_graph_and_leave_inputs_alone():
    f, p, h, v = mlp_problem()
    p = tree.detach(p, requires_grad=True)
    op = hg.FiniteDifferenceOperator(f, p, h, ())
    out, mixed = op(v), op.mixed_vjp(v)
    assert not any(x.requires_grad for x in tree.leaves(out) + tree.leaves(mixed))
    assert all(x.grad is None for x in tree.leaves(p))


def test_every_solver_works_unchanged_ift_against_dense_reference():
    prob = testing.logistic_problem(seed=3, n_features=6)
    ref = testing.reference_implicit_grad(prob.inner_loss, prob.outer_loss, prob.params,
                                          prob.hparams)
    op = hg.FiniteDifferenceOperator(prob.inner_loss, prob.params, prob.hparams, ())
    wl = prob.params.detach().requires_grad_(True)
    dl = torch.autograd.grad(prob.outer_loss(wl, prob.hparams), wl)[0]
    for solver in (functools.partial(hg.cg, maxiter=50, tol=1e-12),
                   functools.partial(hg.minres, maxiter=50, tol=1e-12),
                   functools.partial(hg.gmres, maxiter=50, tol=1e-12)):
        res = solver(op, dl)
        assert bool(res.converged)
        assert _rel(-op.mixed_vjp(res.solution), ref) < 1e-6


def test_extra_args_and_hparams_free_form():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    op = hg.FiniteDifferenceOperator(lambda p, M: 0.5 * p @ M @ p, torch.ones(2, dtype=A.dtype),
                                     None, (A,))
    torch.testing.assert_close(op(torch.tensor([1.0, 0.0], dtype=A.dtype)), A[:, 0])
    torch.testing.assert_close(
        hg.fd_mixed_vjp(lambda p, h: (h * p**2).sum(), torch.tensor([1.0, 2.0], dtype=A.dtype),
                        torch.ones(2, dtype=A.dtype), torch.ones(2, dtype=A.dtype)),
        torch.tensor([2.0, 4.0], dtype=A.dtype))


# ------------------------------------------------------------------------ precision
def test_autocast_bfloat16_forward_keeps_float32_products():
    f, p, h, v = mlp_problem(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        op = hg.FiniteDifferenceOperator(f, p, h, ())
        out = op(v)
        mixed = op.mixed_vjp(v)
    assert op.compute_dtype == torch.bfloat16
    assert op.eps == pytest.approx(hg.default_fd_step(torch.bfloat16))
    assert all(x.dtype == torch.float32 for x in tree.leaves(out) + tree.leaves(mixed))
    exact = hg.HessianOperator(f, p, h, ())
    assert _rel(out, exact(v)) < 0.2  # bfloat16 rounding (2^-8) through a finite difference


# ------------------------------------------------------------------------ errors
def test_bad_input_errors_name_the_argument():
    f, p, h, v = mlp_problem()
    with pytest.raises(TypeError, match="`fn` must be callable"):
        hg.FiniteDifferenceOperator(3, p, h, ())
    with pytest.raises(ValueError, match="`eps` must be a finite number > 0"):
        hg.FiniteDifferenceOperator(f, p, h, (), eps=0.0)
    with pytest.raises(ValueError, match="`params` leaf"):
        hg.FiniteDifferenceOperator(f, {**p, "b1": p["b1"] * float("nan")}, h, ())
    with pytest.raises(ValueError, match="mixed_vjp` needs `hparams`"):
        hg.FiniteDifferenceOperator(lambda q: (q**2).sum(), torch.ones(2), None, ()).mixed_vjp(
            torch.ones(2))
    op = hg.FiniteDifferenceOperator(f, p, h, ())
    with pytest.raises(ValueError, match="same structure"):
        op({"w1": v["w1"]})
    with pytest.raises(TypeError, match="dtype"):
        op(tree.map(lambda t: t.float(), v))
    nonscalar = hg.FiniteDifferenceOperator(lambda q: q * 2, torch.ones(2), None, (),
                                            name="inner_loss")
    with pytest.raises(ValueError, match="`inner_loss` must return a scalar"):
        nonscalar(torch.ones(2))


def test_docstring_examples():
    res = doctest.testmod(fdm, extraglobs={"hg": hg}, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 4 and res.failed == 0
