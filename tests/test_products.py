"""hvp / make_hvp / mixed_vjp against dense second derivatives from torch.func."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import hypergrad as hg
from hypergrad import testing


def mlp_problem(seed: int = 0, dtype: torch.dtype = torch.float64):
    """A tanh MLP (dict params via functional_call), a data batch, and hyperparameters
    (per-input scales and per-layer log weight decays) that enter the loss non-linearly."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2), torch.nn.Tanh()
    ).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randn(7, 2, dtype=torch.float64)
    hparams = {"scale": torch.rand(3, dtype=torch.float64) + 0.5, "log_wd": torch.randn(2)}
    # draw everything in float64, then cast: the float32 problem is the same problem, rounded
    net, x, y = net.to(dtype), x.to(dtype), y.to(dtype)
    hparams = {k: v.to(dtype) for k, v in hparams.items()}
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, h):
        out = functional_call(net, p, (x * h["scale"],))
        wd = h["log_wd"].exp()
        reg = wd[0] * (p["0.weight"] ** 2).sum() + wd[1] * (p["2.weight"] ** 2).sum()
        return ((out - y) ** 2).mean() + 0.5 * reg

    return loss, params, hparams


def flat(t) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in hg.tree.leaves(t)])


def unflat_like(v: torch.Tensor, like):
    leaves, spec = hg.tree.flatten(like)
    out, i = [], 0
    for x in leaves:
        out.append(v[i : i + x.numel()].reshape(x.shape))
        i += x.numel()
    return hg.tree.unflatten(out, spec)


def dense_hessian_via_func(loss, params, hparams) -> torch.Tensor:
    """torch.func.hessian on the dict, assembled into an n x n matrix (independent of testing)."""
    blocks = torch.func.hessian(loss)(params, hparams)
    keys = list(params)
    return torch.cat(
        [
            torch.cat([blocks[a][b].reshape(params[a].numel(), params[b].numel()) for b in keys], 1)
            for a in keys
        ],
        0,
    )


def test_hvp_matches_torch_func_hessian_on_mlp():
    loss, params, hparams = mlp_problem()
    H = dense_hessian_via_func(loss, params, hparams)
    assert H.shape == (hg.tree.numel(params),) * 2
    torch.testing.assert_close(H, H.T, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = unflat_like(torch.randn(H.shape[0], generator=g), params)
        hv = hg.hvp(loss, params, v, hparams)
        assert set(hv) == set(params) and all(hv[k].shape == params[k].shape for k in params)
        torch.testing.assert_close(flat(hv), H @ flat(v), rtol=1e-10, atol=1e-12)


def test_make_hvp_reuses_one_graph_and_matches_dense_hessian():
    loss, params, hparams = mlp_problem(seed=2)
    calls = []

    def counted(p, h):
        calls.append(1)
        return loss(p, h)

    op = hg.make_hvp(counted, params, hparams)
    H = dense_hessian_via_func(loss, params, hparams)
    n = H.shape[0]
    cols = [flat(op(unflat_like(torch.eye(n)[i], params))) for i in range(n)]
    assert len(calls) == 1, "make_hvp must evaluate fn once and reuse the gradient graph"
    torch.testing.assert_close(torch.stack(cols, 1), H, rtol=1e-10, atol=1e-12)
    # the operator also exposes the value and the (detached) first-order gradient
    torch.testing.assert_close(op.value, loss(params, hparams))
    g_ref = torch.func.grad(loss)(params, hparams)
    torch.testing.assert_close(flat(op.grad), flat(g_ref), rtol=1e-12, atol=1e-14)
    assert not any(x.requires_grad for x in hg.tree.leaves(op.grad))


def test_mixed_vjp_matches_dense_jacobian():
    loss, params, hparams = mlp_problem(seed=3)
    # d/dh of the gradient in params, by jacrev of torch.func.grad: (n_params, n_hparams)
    n_h = hg.tree.numel(hparams)

    def grad_p_of_h(hv):
        return flat(torch.func.grad(loss)(params, unflat_like(hv, hparams)))

    M = torch.func.jacrev(grad_p_of_h)(flat(hparams))
    assert M.shape == (hg.tree.numel(params), n_h)
    torch.testing.assert_close(M, testing.dense_mixed(loss, params, hparams), rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        v = unflat_like(torch.randn(M.shape[0], generator=g), params)
        out = hg.mixed_vjp(loss, params, hparams, v)
        assert set(out) == set(hparams)
        torch.testing.assert_close(flat(out), M.T @ flat(v), rtol=1e-10, atol=1e-12)


def test_products_on_a_known_cubic():
    # f = sum(h * p^3): H = diag(6 h p), d2f/dp dh = diag(3 p^2)
    p = torch.tensor([1.0, -2.0, 0.5])
    h = torch.tensor([0.3, 1.5, -1.0])
    v = torch.tensor([1.0, 2.0, -3.0])

    def f(p, h):
        return (h * p**3).sum()

    torch.testing.assert_close(hg.hvp(f, p, v, h), 6 * h * p * v, rtol=1e-15, atol=0)
    torch.testing.assert_close(hg.mixed_vjp(f, p, h, v), 3 * p**2 * v, rtol=1e-15, atol=0)


def test_unused_hparams_get_zero_mixed_product_and_linear_fn_zero_hessian():
    def f(p, h):
        return (h["used"] * p**2).sum() + (h["only_direct"] ** 2).sum()

    p = torch.tensor([1.0, 2.0])
    h = {
        "used": torch.tensor([1.0, 3.0]),
        "only_direct": torch.tensor([5.0]),
        "unused": torch.ones(2),
    }
    out = hg.mixed_vjp(f, p, h, torch.ones(2))
    torch.testing.assert_close(out["used"], 2 * p)
    assert torch.equal(out["only_direct"], torch.zeros(1))
    assert torch.equal(out["unused"], torch.zeros(2))
    # linear in p: the gradient has no graph to p, the Hessian is exactly zero
    lin = hg.hvp(lambda p, h: (h["used"] * p).sum(), p, torch.ones(2), h)
    assert torch.equal(lin, torch.zeros(2))
    # constant in p entirely: no autograd path to params is an error, not a zero Hessian
    # (issue 13.5: a .detach() inside the loss gave silent zeros)
    with pytest.raises(ValueError, match="does not depend on `params`"):
        hg.hvp(lambda p: torch.tensor(3.0), p, torch.ones(2))


def test_products_are_pure():
    loss, params, hparams = mlp_problem(seed=5)
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    hparams = {k: v.clone().requires_grad_(True) for k, v in hparams.items()}
    before = {k: v.detach().clone() for k, v in params.items()}
    hv = hg.hvp(loss, params, hg.tree.map(torch.ones_like, params), hparams)
    mv = hg.mixed_vjp(loss, params, hparams, hg.tree.map(torch.ones_like, params))
    assert all(x.grad is None for x in hg.tree.leaves(params) + hg.tree.leaves(hparams))
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert not hg.tree.requires_grad(hv) and not hg.tree.requires_grad(mv)


def test_extra_args_are_passed_detached():
    a = torch.tensor(2.0, requires_grad=True)
    out = hg.hvp(lambda p, a: a * (p**2).sum(), torch.ones(2), torch.ones(2), a)
    torch.testing.assert_close(out, torch.tensor([4.0, 4.0]))
    assert a.grad is None and not out.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_keep_dtype(dtype):
    loss, params, hparams = mlp_problem(seed=6, dtype=dtype)
    v = hg.tree.map(torch.ones_like, params)
    hv = hg.hvp(loss, params, v, hparams)
    mv = hg.mixed_vjp(loss, params, hparams, v)
    assert all(x.dtype == dtype for x in hg.tree.leaves(hv) + hg.tree.leaves(mv))
    if dtype == torch.float32:  # float32 smoke: agrees with the float64 product to ~1e-5
        loss64, p64, h64 = mlp_problem(seed=6)
        ref = hg.hvp(loss64, p64, hg.tree.map(torch.ones_like, p64), h64)
        torch.testing.assert_close(flat(hv).double(), flat(ref), rtol=1e-4, atol=1e-5)


def test_one_shot_products_name_every_non_finite_input_and_make_hvp_checks_at_build():
    loss, params, hparams = mlp_problem(seed=7)
    v = hg.tree.map(torch.ones_like, params)
    bad_v = dict(v, **{"2.bias": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match=r"`v` leaf 3 \(shape \(2,\)\) contains NaN/inf"):
        hg.hvp(loss, params, bad_v, hparams)
    with pytest.raises(ValueError, match="`v` leaf 3"):
        hg.mixed_vjp(loss, params, hparams, bad_v)
    nan_loss = lambda p, h: loss(p, h) + torch.log(-h["scale"].sum())  # noqa: E731
    with pytest.raises(ValueError, match="value of `fn` at `params` is NaN/inf"):
        hg.make_hvp(nan_loss, params, hparams)
    # a built operator checks v's structure per product, never its values (no host read):
    # a NaN v gives a NaN product, as documented
    op = hg.make_hvp(loss, params, hparams)
    assert not hg.tree.all_finite(op(bad_v))
    with pytest.raises(ValueError, match="`v`"):
        op({"only": torch.ones(2)})


def test_a_loss_detached_from_params_raises_but_a_linear_one_has_zero_hessian():
    p = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="`fn` does not depend on `params`.*detach"):
        hg.make_hvp(lambda p: (p.detach() ** 2).sum(), p)
    with pytest.raises(ValueError, match="does not depend on `params`"):
        hg.mixed_vjp(lambda p, h: (h * p.detach()).sum(), p, torch.ones(2), torch.ones(2))
    assert torch.equal(hg.hvp(lambda p: (3.0 * p).sum(), p, torch.ones(2)), torch.zeros(2))


def test_a_once_differentiable_function_raises_instead_of_zeros():
    """``@once_differentiable`` runs its backward under no_grad and links the result to an
    error node only when the incoming gradient requires grad: applied last (here: scaled by
    the constant h), torch's exact products silently read as zeros. hypergrad finds the
    function on the path to params in the loss graph and raises; applied inside (squared),
    torch's own "differentiate twice" error gets the same way out."""
    from torch.autograd.function import once_differentiable

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 3

        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x ** 2 * g

    p, h, v = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), torch.ones(2)
    for f in (lambda p, h: (h * Cube.apply(p)).sum(),
              lambda p, h: (h * Cube.apply(p) ** 2).sum()):
        for call in (lambda f=f: hg.hvp(lambda q: f(q, h), p, v),
                     lambda f=f: hg.mixed_vjp(f, p, h, v),
                     lambda f=f: hg.implicit_jvp(f, p, h, v, stationarity_tol=None)):
            with pytest.raises(hg.DoubleBackwardError, match="once_differentiable"):
                call()
    f = lambda p, h: (h * Cube.apply(p)).sum()  # noqa: E731
    torch.testing.assert_close(hg.fd_hvp(lambda q: f(q, h), p, v), 6 * h * p)  # first order
    # a once-differentiable function that does not reach params changes nothing
    g = lambda p, h: (h * p ** 3).sum() + Cube.apply(h).sum()  # noqa: E731
    torch.testing.assert_close(hg.mixed_vjp(g, p, h, v), 3 * p ** 2)
