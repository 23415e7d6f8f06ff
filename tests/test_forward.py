"""Forward mode: implicit_jvp, implicit_jacobian, step_jvp, forward_hypergrad.

References that do not use the code under test: ``torch.func.jacrev`` of closed-form inner
solutions (a quadratic on nested pytrees, ridge regression), and hand-written reverse-mode
unrolls in plain autograd (gradient descent, Adam written out from its formulas). float64.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torchopt

import hypergrad as hg
from hypergrad import testing, tree

CG = functools.partial(hg.cg, tol=1e-13, maxiter=500)


def _rel(a, b) -> float:
    fa = torch.cat([x.detach().reshape(-1) for x in tree.leaves(a)])
    fb = torch.cat([x.detach().reshape(-1) for x in tree.leaves(b)])
    return float((fa - fb).norm() / fb.norm()) if fb.norm() > 0 else float(fa.norm())


# --- closed-form problems -----------------------------------------------------------------------
def _quadratic(n_p: int, n_h: int, seed: int = 0):
    """``f = 0.5 p^T A p - p^T (B tanh(h) + c)``, quadratic in p with the closed form
    ``p*(h) = A^{-1}(B tanh(h) + c)`` (nonlinear in h, so the Jacobian varies with h)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n_p, n_p, generator=g))[0]
    A = Q @ torch.diag(torch.linspace(1.0, 20.0, n_p)) @ Q.T
    B = torch.randn(n_p, n_h, generator=g)
    c = torch.randn(n_p, generator=g)
    h = torch.randn(n_h, generator=g)

    def f(p, h):
        return 0.5 * p @ A @ p - p @ (B @ torch.tanh(h) + c)

    def solution(h):
        return torch.linalg.solve(A, B @ torch.tanh(h) + c)

    return f, solution, h


def _ridge(seed: int = 0, n_features: int = 6):
    prob = testing.ridge_problem(seed=seed, n_features=n_features)
    X, y = prob.extras["X"], prob.extras["y"]
    n = X.shape[0]

    def solution(h):
        return torch.linalg.solve(X.T @ X / n + torch.diag(h.exp()), X.T @ y / n)

    return prob.inner_loss, solution, prob.hparams, prob.params


def _nested(n_h_split=(2, 1)):
    """The quadratic on pytrees: params {"a": (2,), "b": ((3,), (2, 2))},
    hparams [(2,), {"c": (1,)}]."""
    f, solution, h = _quadratic(9, sum(n_h_split), seed=4)

    def p_tree(v):
        return {"a": v[:2], "b": (v[2:5], v[5:].reshape(2, 2))}

    def p_flat(p):
        return torch.cat([p["a"], p["b"][0], p["b"][1].reshape(-1)])

    def h_tree(v):
        return [v[:2], {"c": v[2:]}]

    def h_flat(ht):
        return torch.cat([ht[0], ht[1]["c"]])

    def f_tree(p, ht):
        return f(p_flat(p), h_flat(ht))

    def sol_tree(ht):
        return p_tree(solution(h_flat(ht)))

    return f_tree, sol_tree, h_tree(h)


# --- implicit_jvp ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: _quadratic(7, 3), lambda: _ridge()[:3]])
def test_implicit_jvp_matches_jacrev_of_the_closed_form(make):
    f, solution, h = make()
    u = torch.randn(h.shape)
    got, info = hg.implicit_jvp(f, solution(h), h, u, solver=CG, return_info=True)
    ref = torch.func.jacrev(solution)(h) @ u
    assert _rel(got, ref) < 1e-8
    assert info["trusted"]


def test_implicit_jvp_on_pytrees():
    f, sol, h = _nested()
    u = tree.map(torch.randn_like, h)
    got = hg.implicit_jvp(f, sol(h), h, u, solver=CG)
    ref = torch.func.jvp(sol, (h,), (u,))[1]
    tree.check_same_structure(got, ref)
    assert _rel(got, ref) < 1e-8


def test_implicit_jvp_default_solver_and_the_reverse_mode_agree():
    f, solution, h = _quadratic(6, 2)
    p = solution(h)
    u = torch.tensor([0.3, -1.1])
    jvp = hg.implicit_jvp(f, p, h, u)
    # <v, J u> == <J^T v, u>: the reverse-mode IFT (implicit_grad) with outer loss <v, p>
    v = torch.randn(6)
    vjp = hg.implicit_grad(f, lambda p, h: (v * p).sum(), p, h)
    torch.testing.assert_close(torch.dot(v, jvp), torch.dot(vjp, u), rtol=1e-5, atol=0)


def test_implicit_jvp_reports_a_non_stationary_point_and_negative_curvature():
    f, solution, h = _quadratic(5, 2)
    u = torch.ones(2)
    with pytest.warns(hg.HypergradientWarning, match="not a stationary point"):
        hg.implicit_jvp(f, solution(h) + 1.0, h, u, solver=CG)
    saddle = lambda p, h: -0.5 * (p**2).sum() + (p * h).sum()  # noqa: E731
    with pytest.raises(hg.HypergradientError, match="non-positive curvature"):
        hg.implicit_jvp(saddle, torch.ones(2), torch.ones(2), torch.ones(2), on_failure="raise")


# --- implicit_jacobian ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_p, n_h", [(7, 3), (3, 7), (5, 5)])
@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_implicit_jacobian_matches_jacrev(n_p, n_h, mode):
    f, solution, h = _quadratic(n_p, n_h, seed=n_p + n_h)
    J, info = hg.implicit_jacobian(f, solution(h), h, solver=CG, mode=mode, return_info=True)
    ref = torch.func.jacrev(solution)(h)
    assert J.shape == ref.shape == (n_p, n_h)
    assert _rel(J, ref) < 1e-8
    expected = mode if mode != "auto" else ("forward" if n_h <= n_p else "reverse")
    assert info["mode"] == expected and info["trusted"]


def test_implicit_jacobian_ridge_closed_form():
    f, solution, h, w = _ridge(seed=3, n_features=8)
    J = hg.implicit_jacobian(f, w, h, solver=CG)
    assert _rel(J, torch.func.jacrev(solution)(h)) < 1e-8


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("batch_size", [None, 1, 2])
def test_implicit_jacobian_pytree_layout_is_jacrevs(mode, batch_size):
    f, sol, h = _nested()
    J = hg.implicit_jacobian(f, sol(h), h, solver=CG, mode=mode, batch_size=batch_size)
    ref = torch.func.jacrev(sol)(h)
    assert tree.flatten(J)[1] == tree.flatten(ref)[1]
    for a, b in zip(tree.leaves(J), tree.leaves(ref)):
        assert a.shape == b.shape
    assert _rel(J, ref) < 1e-8


def test_implicit_jacobian_tensor_shapes_are_params_then_hparams():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(2, 3, 4, generator=g)

    def f(p, h):  # p* = M h (a (2, 3) matrix from a (4,) vector), p.shape + h.shape = (2, 3, 4)
        return 0.5 * ((p - torch.einsum("abk,k->ab", M, h)) ** 2).sum()

    h = torch.randn(4, generator=g)
    p = torch.einsum("abk,k->ab", M, h)
    for mode in ("forward", "reverse"):
        J = hg.implicit_jacobian(f, p, h, solver=CG, mode=mode)
        assert J.shape == (2, 3, 4)
        torch.testing.assert_close(J, M, rtol=1e-12, atol=1e-12)


def test_implicit_jacobian_equals_the_loop_of_reverse_solves():
    f, solution, h = _quadratic(6, 3, seed=9)
    p = solution(h)
    J = hg.implicit_jacobian(f, p, h, solver=CG)
    rows = torch.stack([hg.implicit_grad(f, lambda q, hh, i=i: q[i], p, h, solver=CG)
                        for i in range(6)])
    assert _rel(J, rows) < 1e-8


def test_implicit_jacobian_reports_an_unconverged_solve():
    f, solution, h = _quadratic(8, 2)
    with pytest.warns(hg.HypergradientWarning, match="did not converge"):
        hg.implicit_jacobian(f, solution(h), h, solver=functools.partial(hg.cg, maxiter=1))


# --- forward_hypergrad ---------------------------------------------------------------------------
def _inner_problem(n: int = 4, k: int = 5, seed: int = 0):
    """A non-quadratic inner loss on params {"w": (n,), "b": ()} with hparams {"l": (k-1,),
    "s": ()}: per-group data weights and a log weight decay."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(12, n, generator=g)
    y = torch.randn(12, generator=g)
    grp = torch.arange(12) % (k - 1)
    Xv = torch.randn(8, n, generator=g)
    yv = torch.randn(8, generator=g)

    def f(p, h):
        r = X @ p["w"] + p["b"] - y
        wts = 2 * torch.sigmoid(h["l"])[grp]
        return (wts * torch.log(torch.cosh(r))).mean() + 0.5 * h["s"].exp() * (p["w"] ** 2).sum()

    def val(p, h):
        return ((Xv @ p["w"] + p["b"] - yv) ** 2).mean() + 0.1 * (h["l"] ** 2).sum()

    p0 = {"w": 0.1 * torch.randn(n, generator=g), "b": torch.zeros(())}
    h = {"l": 0.3 * torch.randn(k - 1, generator=g), "s": torch.tensor(-1.0)}
    return f, val, p0, h


def _reference_gd(f, val, p0, h, lr, T):
    """Full reverse-mode unroll of gradient descent in plain autograd."""
    hh = tree.detach(h, requires_grad=True)
    p = tree.detach(p0)
    for _ in range(T):
        ps = [p["w"], p["b"]] if p["w"].requires_grad else [
            p["w"].requires_grad_(True), p["b"].requires_grad_(True)]
        gw, gb = torch.autograd.grad(f(p, hh), ps, create_graph=True)
        p = {"w": p["w"] - lr * gw, "b": p["b"] - lr * gb}
    return torch.autograd.grad(val(p, hh), tree.leaves(hh)), p


def _reference_adam(f, val, p0, h, lr, T, b1=0.9, b2=0.999, eps=1e-8):
    """Full reverse-mode unroll of Adam written out from its formulas (Kingma & Ba 2015)."""
    hh = tree.detach(h, requires_grad=True)
    p = {k: v.detach().clone().requires_grad_(True) for k, v in p0.items()}
    m = {k: torch.zeros_like(v) for k, v in p0.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p0.items()}
    for t in range(1, T + 1):
        gs = dict(zip(p, torch.autograd.grad(f(p, hh), list(p.values()), create_graph=True)))
        m = {k: b1 * m[k] + (1 - b1) * gs[k] for k in p}
        v2 = {k: b2 * v2[k] + (1 - b2) * gs[k] ** 2 for k in p}
        p = {k: p[k] - lr * (m[k] / (1 - b1**t)) / ((v2[k] / (1 - b2**t)).sqrt() + eps)
             for k in p}
    return torch.autograd.grad(val(p, hh), tree.leaves(hh)), p


@pytest.mark.parametrize("T", [1, 25])
def test_forward_hypergrad_gradient_step_equals_plain_autograd_unroll(T):
    f, val, p0, h = _inner_problem()
    got, pT = hg.forward_hypergrad(hg.gradient_step(f, lr=0.3), p0, h, T, val,
                                   return_state=True)
    ref, p_ref = _reference_gd(f, val, p0, h, 0.3, T)
    assert _rel(got, list(ref)) < 1e-10
    assert _rel(pT, p_ref) < 1e-13
    assert all(x.grad_fn is None for x in tree.leaves(pT))


def test_forward_hypergrad_torchopt_adam_equals_plain_autograd_unroll():
    f, val, p0, h = _inner_problem(seed=1)
    opt = torchopt.adam(lr=0.05)
    got = hg.forward_hypergrad(hg.optimizer_step(f, opt), (p0, opt.init(p0)), h, 30,
                               lambda s, hh: val(s[0], hh))
    ref, _ = _reference_adam(f, val, p0, h, 0.05, 30)
    assert _rel(got, list(ref)) < 1e-9


def test_forward_hypergrad_equals_hg_unroll_for_a_tensor_hparam():
    f0, val0, p0, h = _inner_problem(seed=2)
    f = lambda p, l: f0(p, {"l": l, "s": h["s"]})  # noqa: E731
    val = lambda s, l: val0(s[0], {"l": l, "s": h["s"]})  # noqa: E731
    opt = torchopt.adam(lr=0.02, eps_root=1e-12)
    step = hg.optimizer_step(f, opt)
    got = hg.forward_hypergrad(step, (p0, opt.init(p0)), h["l"], 12, val)
    hl = h["l"].clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(val(hg.unroll(step, (p0, opt.init(p0)), hl, 12), hl), hl)
    assert got.shape == h["l"].shape
    assert _rel(got, ref) < 1e-10


def test_forward_hypergrad_zero_steps_is_the_direct_gradient():
    f, val, p0, h = _inner_problem()
    got = hg.forward_hypergrad(hg.gradient_step(f, lr=0.1), p0, h, 0, val)
    torch.testing.assert_close(got["l"], 0.2 * h["l"])
    torch.testing.assert_close(got["s"], torch.zeros(()))


def test_step_jvp_chained_online_equals_forward_hypergrad_and_takes_reparametrised_inputs():
    # phi enters only through x(phi) = phi * a: hparams {"x": x} with tangent dx/dphi = a
    # (how a task with a cheap input derivative, e.g. rotated images, feeds the tangent in).
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, generator=g)
    C = torch.randn(6, 3, generator=g)

    def f_x(p, hx):
        return 0.5 * ((C @ p - hx["x"]) ** 2).sum() + 0.1 * (p**4).sum()

    phi = torch.tensor(0.7)
    opt = torchopt.adam(lr=0.05)
    step = hg.optimizer_step(f_x, opt)
    p0 = torch.zeros(3) + 0.1
    state = (p0, opt.init(p0))
    Z = tree.map(lambda x: torch.zeros(1, *x.shape, dtype=x.dtype), state)
    for t in range(15):
        state, Z = hg.step_jvp(step, state, {"x": phi * a}, Z, {"x": a[None]}, t)
    # reference: d p_T / d phi by the reverse-mode unroll in phi directly
    step_phi = hg.optimizer_step(lambda p, ph: f_x(p, {"x": ph * a}), opt)
    ph = phi.clone().requires_grad_(True)
    pT = hg.unroll(step_phi, (p0, opt.init(p0)), ph, 15)[0]
    ref = torch.stack([torch.autograd.grad(pT[i], ph, retain_graph=True)[0] for i in range(3)])
    assert _rel(Z[0][0], ref) < 1e-10
    counts = [(z, x) for z, x in zip(tree.leaves(Z), tree.leaves(state))
              if not x.is_floating_point()]  # Adam's step count: zero tangents, dtype kept
    assert counts and all(z.dtype == x.dtype and not z.any() for z, x in counts)


def test_step_jvp_batches_directions():
    f, val, p0, h = _inner_problem(k=4)
    step = hg.gradient_step(f, lr=0.2)
    U = {"l": torch.eye(3), "s": torch.zeros(3)}
    Z0 = tree.map(lambda x: torch.zeros(3, *x.shape), p0)
    _, Z = hg.step_jvp(step, p0, h, Z0, U)
    for i in range(3):
        Ui = {"l": torch.eye(3)[i : i + 1], "s": torch.zeros(1)}
        _, Zi = hg.step_jvp(step, p0, h, tree.map(lambda x: x[:1], Z0), Ui)
        torch.testing.assert_close(Z["w"][i], Zi["w"][0], rtol=1e-13, atol=1e-15)


# --- bad input ------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    f, solution, h = _quadratic(4, 2)
    p = solution(h)
    with pytest.raises(ValueError, match="tangents"):
        hg.implicit_jvp(f, p, h, torch.ones(3))
    with pytest.raises(TypeError, match="inner_loss"):
        hg.implicit_jvp("f", p, h, torch.ones(2))
    with pytest.raises(TypeError, match="hparams"):
        hg.implicit_jacobian(f, p, h.float())
    with pytest.raises(ValueError, match="mode"):
        hg.implicit_jacobian(f, p, h, mode="backward")
    with pytest.raises(ValueError, match="batch_size"):
        hg.implicit_jacobian(f, p, h, batch_size=0)
    with pytest.raises(ValueError, match="on_failure"):
        hg.implicit_jacobian(f, p, h, on_failure="shout")
    with pytest.raises(ValueError, match="inner_loss"):
        hg.implicit_jacobian(lambda p, h: p * h.sum(), p, h)
    with pytest.raises(ValueError, match="params"):
        hg.implicit_jvp(f, p * float("inf"), h, torch.ones(2))


def test_forward_hypergrad_bad_input_names_the_argument():
    f, val, p0, h = _inner_problem()
    step = hg.gradient_step(f, lr=0.1)
    with pytest.raises(ValueError, match="steps"):
        hg.forward_hypergrad(step, p0, h, -1, val)
    with pytest.raises(TypeError, match="step"):
        hg.forward_hypergrad(None, p0, h, 3, val)
    with pytest.raises(TypeError, match="outer_loss"):
        hg.forward_hypergrad(step, p0, h, 3, 1.0)
    with pytest.raises(ValueError, match="outer_loss"):
        hg.forward_hypergrad(step, p0, h, 3, lambda p, hh: p["w"])
    with pytest.raises(ValueError, match="`step` must return"):
        hg.forward_hypergrad(lambda p, hh, t: p["w"], p0, h, 3, val)
    with pytest.raises(TypeError, match="hparams"):
        hg.forward_hypergrad(step, p0, tree.map(lambda x: x.float(), h), 3, val)
    with pytest.raises(ValueError, match="params"):
        hg.forward_hypergrad(step, {"n": torch.tensor(3)}, h, 3, val)
    with pytest.raises(ValueError, match="state_tangents"):
        hg.step_jvp(step, p0, h, tree.map(lambda x: torch.zeros(2, *x.shape), p0),
                    tree.map(lambda x: torch.zeros(3, *x.shape), h))
    with pytest.raises(ValueError, match=r"shape \(k, \*\(4,\)\)"):
        hg.step_jvp(step, p0, h, tree.map(torch.zeros_like, p0),
                    tree.map(lambda x: torch.zeros(1, *x.shape), h))


def _counting_grad(monkeypatch, batched_error: str | None):
    """Patch ``torch.autograd.grad`` to count batched and plain calls; batched calls raise
    ``RuntimeError(batched_error)`` when it is given."""
    real = torch.autograd.grad
    calls = {"batched": 0, "plain": 0}

    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            calls["batched"] += 1
            if batched_error is not None:
                raise RuntimeError(batched_error)
        else:
            calls["plain"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    return calls


def test_batched_backward_falls_back_to_a_loop_once_per_call(monkeypatch):
    """An op without a vmap rule makes ``is_grads_batched`` raise: the rows are then done one
    backward at a time, with the same result, and the call remembers it: one failed batched
    attempt per call, not one per product."""
    f, solution, h = _quadratic(5, 3, seed=2)
    ref, info = hg.implicit_jacobian(f, solution(h), h, solver=CG, mode="forward",
                                     return_info=True)
    products = int(info["solves"][0].iterations) + 1  # the solver's, and M E
    calls = _counting_grad(monkeypatch, "Batching rule not implemented for aten::something")
    got = hg.implicit_jacobian(f, solution(h), h, solver=CG, mode="forward")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert calls["batched"] == 1
    assert products > 3  # so one failed attempt per product would have shown
    # forward_hypergrad: one attempt for the whole trajectory
    fi, val, p0, hp = _inner_problem()
    step = hg.gradient_step(fi, lr=0.1)
    calls["batched"] = 0
    hg.forward_hypergrad(step, p0, hp, 4, val)
    assert calls["batched"] == 1


def test_batched_backward_reraises_errors_that_are_not_about_batching(monkeypatch):
    f, solution, h = _quadratic(5, 3, seed=2)
    calls = _counting_grad(monkeypatch, "CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RuntimeError, match="out of memory"):
        hg.implicit_jacobian(f, solution(h), h, solver=CG, mode="forward")
    assert calls["batched"] == 1  # raised at once: no row-by-row retry hiding it


def test_an_op_with_no_batching_rule_in_the_double_backward():
    """A real one: a custom autograd.Function whose backward reads a value (``.item()``),
    which vmap cannot batch. The result equals the batched one of the same function without
    the read."""

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, read):
            ctx.read = read
            return 2.0 * x

        @staticmethod
        def backward(ctx, g):
            if ctx.read:
                float(g.sum().item())  # vmap: "calling .item() on a Tensor" under batching
            return 2.0 * g, None

    f, solution, h = _quadratic(5, 3, seed=2)

    def make(read):
        return lambda p, hh: f(p, hh) + 0.1 * (Scale.apply(p, read) ** 2).sum()

    p = solution(h)
    ref = hg.implicit_jacobian(make(False), p, h, solver=CG, stationarity_tol=None)
    got = hg.implicit_jacobian(make(True), p, h, solver=CG, stationarity_tol=None)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_a_model_without_double_backward_gets_hypergrads_own_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 3, generator=gen)

    def inner(p, hh):  # the default CPU kernel of SDPA has no double backward
        q = x @ p
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return (out ** 2).mean() + (hh * p ** 2).sum()

    p = torch.randn(3, 3, generator=gen)
    h = torch.full((3, 3), 0.1)
    val = lambda p, hh: (p ** 2).sum()  # noqa: E731
    step = hg.gradient_step(inner, lr=0.1)
    calls = {
        "implicit_jvp": lambda: hg.implicit_jvp(inner, p, h, torch.ones_like(h)),
        "implicit_jacobian": lambda: hg.implicit_jacobian(inner, p, h),
        "forward_hypergrad": lambda: hg.forward_hypergrad(step, p, h, 2, val),
        "step_jvp": lambda: hg.step_jvp(step, p, h, torch.zeros(1, 3, 3),
                                        torch.ones(1, 3, 3)),
    }
    for name, call in calls.items():
        with pytest.raises(hg.DoubleBackwardError, match="implicit_grad") as e:
            call()
        assert "derivative for" in str(e.value.__cause__), name  # chained from torch's


def test_captured_tensors_that_require_grad_are_reported():
    f, solution, h = _quadratic(4, 2)
    scale = torch.ones((), requires_grad=True)
    g = lambda p, hh: scale * f(p, hh)  # noqa: E731
    with pytest.warns(hg.HypergradientWarning, match="`inner_loss` uses 1 tensor"):
        hg.implicit_jvp(g, solution(h), h, torch.ones(2), solver=CG)
    with pytest.raises(hg.HypergradientError, match="neither `params` nor `hparams`"):
        hg.implicit_jacobian(g, solution(h), h, solver=CG, on_failure="raise")
    fi, val, p0, hp = _inner_problem()
    step = hg.gradient_step(lambda p, hh: scale * fi(p, hh), lr=0.1)
    with pytest.warns(hg.HypergradientWarning, match="`step` uses 1 tensor") as rec:
        hg.forward_hypergrad(step, p0, hp, 3, val)
    assert len(rec) == 1  # checked on the first step only


def test_adam_with_a_zero_gradient_coordinate_needs_eps_root():
    """A coordinate whose gradient is exactly zero keeps Adam's nu at 0, where d sqrt(nu)/d nu
    is infinite: the tangent is 0 * inf = NaN there; eps_root > 0 makes it 0 and the result
    equals reverse mode (which, for a coordinate the loss never uses, never meets the inf)."""
    f = lambda p, h: ((p[:2] - h) ** 2).sum()  # noqa: E731  (p[2] is unused)
    val = lambda s, h: s[0].sum()  # noqa: E731
    p0, h = torch.zeros(3), torch.tensor([1.0, -2.0])
    for eps_root in (0.0, 1e-30):
        opt = torchopt.adam(lr=0.1, eps_root=eps_root)
        step = hg.optimizer_step(f, opt)
        if eps_root == 0.0:
            with pytest.warns(hg.HypergradientWarning, match="eps_root > 0"):
                got = hg.forward_hypergrad(step, (p0, opt.init(p0)), h, 5, val)
        else:
            got = hg.forward_hypergrad(step, (p0, opt.init(p0)), h, 5, val)
        hh = h.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(val(hg.unroll(step, (p0, opt.init(p0)), hh, 5), hh), hh)
        if eps_root == 0.0:
            assert not bool(torch.isfinite(got).all()) and bool(torch.isfinite(ref).all())
        else:
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
