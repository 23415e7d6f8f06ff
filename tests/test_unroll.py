"""unroll / gradient_step / optimizer_step: exact, truncated and checkpointed backprop."""

from __future__ import annotations

import functools

import pytest
import torch
import torchopt

import hypergrad as hg
from hypergrad import testing
from tests import problems


def quad(seed: int = 0, n: int = 6, m: int = 3, cond: float = 10.0):
    """A quadratic problem plus its pieces: f = 0.5 p^T A p - p^T (B h + c), lr = 1/lambda_max."""
    prob = testing.quadratic_problem(seed=seed, n_params=n, n_hparams=m, cond=cond)
    A, B = prob.extras["A"], prob.extras["B"]
    c = A @ prob.params["x"] - B @ prob.hparams["h"]
    t = -torch.func.grad(prob.outer_loss)({"x": torch.zeros(n)}, prob.hparams)["x"]
    D = torch.func.hessian(lambda h: prob.outer_loss({"x": torch.zeros(n)}, {"h": h}))(
        prob.hparams["h"]
    )
    lr = 1.0 / float(torch.linalg.eigvalsh(A).max())
    return prob, A, B, c, t, D, lr


def unrolled_hypergrad(prob, steps, lr, p0=None, **kw):
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    p0 = hg.tree.zeros_like(prob.params) if p0 is None else p0
    p = hg.unroll(hg.gradient_step(prob.inner_loss, lr=lr), p0, h, steps, **kw)
    loss = prob.outer_loss(p, h)
    loss.backward()
    return p, h["h"].grad, loss


def test_truncate_equal_to_steps_is_exactly_the_full_unroll():
    prob, *_, lr = quad()
    p_full, g_full, _ = unrolled_hypergrad(prob, 25, lr)
    p_none, g_none, _ = unrolled_hypergrad(prob, 25, lr, truncate=None)
    p_all, g_all, _ = unrolled_hypergrad(prob, 25, lr, truncate=25)
    assert torch.equal(p_full["x"], p_all["x"]) and torch.equal(p_none["x"], p_all["x"])
    assert torch.equal(g_none, g_all) and torch.equal(g_full, g_all)


def test_full_unroll_equals_the_reference_unroll_grad():
    prob, *_, lr = quad(seed=1)
    _, g, _ = unrolled_hypergrad(prob, 15, lr)
    ref = testing.reference_unroll_grad(
        hg.gradient_step(prob.inner_loss, lr=lr),
        hg.tree.zeros_like(prob.params),
        prob.hparams,
        15,
        prob.outer_loss,
    )
    torch.testing.assert_close(g, ref["h"], rtol=1e-14, atol=1e-15)


def test_truncate_zero_leaves_no_gradient_path():
    prob, *_, lr = quad()
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    p0 = {"x": torch.zeros(6, requires_grad=True)}
    p = hg.unroll(hg.gradient_step(prob.inner_loss, lr=lr), p0, h, 10, truncate=0)
    assert not p["x"].requires_grad and p["x"].grad_fn is None
    # the values are those of the full unroll
    p_full = hg.unroll(hg.gradient_step(prob.inner_loss, lr=lr), p0, h, 10)
    torch.testing.assert_close(p["x"], p_full["x"].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_truncated_unroll_is_the_gradient_of_the_last_k_steps_by_hand(k):
    # p_{s+1} = M p_s + lr (B h + c), M = I - lr A. Holding p_{T-k} fixed:
    # d p_T / d h = lr sum_{i<k} M^i B, so dL/dh = (lr sum_{i<k} M^i B)^T (p_T - t) + D h.
    prob, A, B, c, t, D, lr = quad(seed=2)
    T = 30
    p, g, _ = unrolled_hypergrad(prob, T, lr, truncate=k)
    M = torch.eye(6) - lr * A
    J = lr * sum(torch.linalg.matrix_power(M, i) for i in range(k)) @ B
    expected = J.T @ (p["x"].detach() - t) + D @ prob.hparams["h"]
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)


def test_truncation_changes_the_gradient_when_it_should():
    prob, *_, lr = quad(seed=2)
    _, g_short, _ = unrolled_hypergrad(prob, 30, lr, truncate=2)
    _, g_full, _ = unrolled_hypergrad(prob, 30, lr)
    assert testing.compare(g_short, g_full).rel_error > 1e-3


@pytest.mark.parametrize(
    ("every", "truncate"), [(1, None), (4, None), (7, None), (30, None), (4, 10), (3, 1)]
)
def test_checkpointing_gives_the_same_gradient(every, truncate):
    prob = problems.problem("logistic")  # non-quadratic: the recomputation really matters
    h = prob.hparams.clone().requires_grad_(True)
    step = hg.gradient_step(prob.inner_loss, lr=0.5)
    grads = []
    for ce in (None, every):
        h.grad = None
        w = hg.unroll(
            step, torch.zeros_like(prob.params), h, 30, truncate=truncate, checkpoint_every=ce
        )
        prob.outer_loss(w, h).backward()
        grads.append((w.detach(), h.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-14, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize(("every", "truncate"), [(1, None), (5, None), (20, None), (7, 12)])
def test_checkpointing_recomputes_each_recorded_step_exactly_once(every, truncate):
    prob, *_, lr = quad()
    inner_step = hg.gradient_step(prob.inner_loss, lr=lr)
    calls = []

    def step(p, h, t):
        calls.append(t)
        return inner_step(p, h, t)

    h = hg.tree.detach(prob.hparams, requires_grad=True)
    p = hg.unroll(
        step, hg.tree.zeros_like(prob.params), h, 20, truncate=truncate, checkpoint_every=every
    )
    assert calls == list(range(20))  # the forward runs every step once, in order
    (g,) = torch.autograd.grad(prob.outer_loss(p, h), [h["h"]])  # autograd.grad works too
    recorded = 20 if truncate is None else truncate
    assert sorted(calls[20:]) == list(range(20 - recorded, 20))  # one recomputation each
    _, g_ref, _ = unrolled_hypergrad(prob, 20, lr, truncate=truncate)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)


def test_checkpointing_replays_the_random_state_of_a_stochastic_step():
    prob, *_, lr = quad()
    inner_step = hg.gradient_step(prob.inner_loss, lr=lr)

    def noisy_step(p, h, t):  # a different random step size at every step
        new = inner_step(p, h, t)
        scale = 1 + 0.5 * torch.rand(())
        return hg.tree.map(lambda a, b: a + scale * (b - a), p, new)

    grads = []
    for every in (None, 4):
        torch.manual_seed(123)
        h = hg.tree.detach(prob.hparams, requires_grad=True)
        p = hg.unroll(noisy_step, hg.tree.zeros_like(prob.params), h, 12, checkpoint_every=every)
        prob.outer_loss(p, h).backward()
        grads.append(h["h"].grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-15)


def test_checkpointing_and_truncation_accept_a_naive_autograd_step():
    # A hand-written step that always differentiates with create_graph=True, without
    # gradient_step's care: it must run in checkpointed and truncated segments alike.
    prob, *_, lr = quad()

    def naive_step(p, h, t):
        x = p["x"] if p["x"].requires_grad else p["x"].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(prob.inner_loss({"x": x}, h), x, create_graph=True)
        return {"x": x - lr * g}

    grads = []
    for kw in ({}, {"checkpoint_every": 3}, {"truncate": 6, "checkpoint_every": 4}):
        h = hg.tree.detach(prob.hparams, requires_grad=True)
        p = hg.unroll(naive_step, hg.tree.zeros_like(prob.params), h, 10, **kw)
        prob.outer_loss(p, h).backward()
        grads.append(h["h"].grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-15)
    _, g6, _ = unrolled_hypergrad(prob, 10, lr, truncate=6)
    torch.testing.assert_close(grads[2], g6, rtol=1e-12, atol=1e-15)


def test_checkpointed_unroll_supports_double_backward():
    prob = problems.problem("logistic")  # non-quadratic, so second derivatives are non-trivial
    step = hg.gradient_step(prob.inner_loss, lr=0.5)
    second = []
    for every in (None, 2):
        h = prob.hparams.clone().requires_grad_(True)
        w = hg.unroll(step, torch.zeros_like(prob.params), h, 6, checkpoint_every=every)
        (g,) = torch.autograd.grad(prob.outer_loss(w, h), [h], create_graph=True)
        (gg,) = torch.autograd.grad((g * torch.arange(1.0, 6.0)).sum(), [h])
        second.append((g.detach(), gg))
    torch.testing.assert_close(second[1][0], second[0][0], rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(second[1][1], second[0][1], rtol=1e-10, atol=1e-14)
    assert float(second[0][1].norm()) > 1e-6


def test_step_is_called_with_t_in_order_and_frozen_hparams_when_truncated():
    seen = []

    def step(p, h, t):
        seen.append((t, h.requires_grad))
        return p + h

    h = torch.ones(2, requires_grad=True)
    hg.unroll(step, torch.zeros(2), h, 5, truncate=2)
    assert seen == [(0, False), (1, False), (2, False), (3, True), (4, True)]
    assert hg.unroll(step, torch.zeros(2), h, 0) is not None
    p0 = torch.zeros(2)
    assert hg.unroll(step, p0, h, 0) is p0  # zero steps: the initial state itself


@pytest.mark.parametrize("name", ["quadratic", "ridge", "nested_pytrees"])
def test_long_gradient_descent_unroll_approaches_the_ift_hypergradient(name):
    prob = problems.problem(name)
    H = testing.dense_hessian(prob.inner_loss, prob.params, prob.hparams)
    eig = torch.linalg.eigvalsh(H)
    lr = 1.0 / float(eig.max())
    ift = hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params, prob.hparams)
    assert testing.compare(ift, prob.hypergrad).rel_error < 1e-6
    errors = {}
    # contraction 1 - 1/cond per step; enough steps for 1e-6 at the worst table condition (30)
    steps_needed = int(20 * float(eig.max() / eig.min()))
    for T in (5, steps_needed):
        h = hg.tree.detach(prob.hparams, requires_grad=True)
        p = hg.unroll(
            hg.gradient_step(prob.inner_loss, lr=lr), hg.tree.zeros_like(prob.params), h, T
        )
        prob.outer_loss(p, h).backward()
        g = hg.tree.unflatten([x.grad for x in hg.tree.leaves(h)], hg.tree.flatten(h)[1])
        errors[T] = testing.compare(g, prob.hypergrad).rel_error
    assert errors[steps_needed] < 1e-4
    assert errors[steps_needed] < errors[5]


def test_gradient_step_values_and_graph():
    f = lambda p, h: 0.5 * (h * p**2).sum()  # noqa: E731  grad = h p
    step = hg.gradient_step(f, lr=0.1)
    p, h = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    out = step(p, h, 0)
    torch.testing.assert_close(out, p - 0.1 * h * p, rtol=0, atol=0)
    assert not out.requires_grad  # nothing required grad: no graph kept
    hr = h.clone().requires_grad_(True)
    out = step(p, hr, 0)
    assert out.requires_grad
    (g,) = torch.autograd.grad(out.sum(), hr)
    torch.testing.assert_close(g, -0.1 * p)
    # parameters unused by the loss keep their values
    step2 = hg.gradient_step(lambda p, h: (p["a"] ** 2).sum(), lr=0.5)
    out2 = step2({"a": torch.ones(1), "b": torch.full((2,), 7.0)}, None, 0)
    assert torch.equal(out2["b"], torch.full((2,), 7.0)) and torch.equal(out2["a"], torch.zeros(1))


def test_steps_on_a_loss_that_ignores_the_params_leave_them_unchanged():
    p0 = {"a": torch.tensor([1.0, 2.0])}
    h = torch.tensor(3.0, requires_grad=True)
    for loss in (lambda p, h: torch.tensor(1.0), lambda p, h: h**2):
        out = hg.unroll(hg.gradient_step(loss, lr=0.1), p0, h, 3, truncate=1)
        assert torch.equal(out["a"].detach(), p0["a"])
        opt = torchopt.adam(lr=0.1)
        out, _ = hg.unroll(hg.optimizer_step(loss, opt), (p0, opt.init(p0)), h, 3)
        assert torch.equal(out["a"].detach(), p0["a"])


# ---- torchopt functional optimizers ----------------------------------------------------------


def adam_by_hand(f, p, h, steps, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t in range(1, steps + 1):
        (g,) = torch.autograd.grad(f(p, h), p, create_graph=True)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def ridge_pieces():
    prob = problems.problem("ridge")
    return prob, torch.linspace(-0.5, 0.5, prob.params.numel())


def adam_unroll_loss(prob, p0, h, steps, lr, **kw):
    opt = torchopt.adam(lr=lr)
    state = (p0, opt.init(p0))
    p, _ = hg.unroll(hg.optimizer_step(prob.inner_loss, opt), state, h, steps, **kw)
    return prob.outer_loss(p, h), p


def test_optimizer_step_with_torchopt_adam_matches_a_hand_written_adam_unroll():
    prob, p0 = ridge_pieces()
    h = prob.hparams.clone().requires_grad_(True)
    loss, p = adam_unroll_loss(prob, p0, h, 12, lr=0.05)
    loss.backward()
    h2 = prob.hparams.clone().requires_grad_(True)
    p_hand = adam_by_hand(prob.inner_loss, p0.clone().requires_grad_(True), h2, 12, lr=0.05)
    prob.outer_loss(p_hand, h2).backward()
    torch.testing.assert_close(p.detach(), p_hand.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-9, atol=1e-13)
    assert float(h.grad.norm()) > 1e-6  # a real gradient flowed through the Adam states


def test_optimizer_step_hypergradient_matches_finite_differences():
    prob, p0 = ridge_pieces()
    h = prob.hparams.clone().requires_grad_(True)
    loss, _ = adam_unroll_loss(prob, p0, h, 8, lr=0.05)
    loss.backward()
    eps = 1e-6
    fd = torch.zeros_like(h)
    with torch.no_grad():
        for i in range(h.numel()):
            e = torch.zeros_like(h)
            e[i] = eps
            lp, _ = adam_unroll_loss(prob, p0, prob.hparams + e, 8, lr=0.05)
            lm, _ = adam_unroll_loss(prob, p0, prob.hparams - e, 8, lr=0.05)
            fd[i] = (lp - lm) / (2 * eps)
    assert testing.compare(h.grad, fd).rel_error < 1e-6


def test_optimizer_step_with_truncation_and_checkpointing():
    prob, p0 = ridge_pieces()
    results = []
    for kw in (
        {},
        {"checkpoint_every": 3},
        {"truncate": 10},
        {"truncate": 10, "checkpoint_every": 4},
    ):
        h = prob.hparams.clone().requires_grad_(True)
        loss, _ = adam_unroll_loss(prob, p0, h, 10, lr=0.05, **kw)
        loss.backward()
        results.append(h.grad)
    for g in results[1:]:
        torch.testing.assert_close(g, results[0], rtol=1e-10, atol=1e-15)
    h = prob.hparams.clone().requires_grad_(True)
    loss, _ = adam_unroll_loss(prob, p0, h, 10, lr=0.05, truncate=3)
    loss.backward()
    assert testing.compare(h.grad, results[0]).rel_error > 1e-6


def test_optimizer_step_sgd_matches_gradient_step():
    prob, p0 = ridge_pieces()
    h = prob.hparams.clone().requires_grad_(True)
    opt = torchopt.sgd(lr=0.3)
    p, _ = hg.unroll(hg.optimizer_step(prob.inner_loss, opt), (p0, opt.init(p0)), h, 7)
    prob.outer_loss(p, h).backward()
    h2 = prob.hparams.clone().requires_grad_(True)
    p2 = hg.unroll(hg.gradient_step(prob.inner_loss, lr=0.3), p0, h2, 7)
    prob.outer_loss(p2, h2).backward()
    torch.testing.assert_close(p.detach(), p2.detach(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-12, atol=1e-15)


# ---- float32 smoke ---------------------------------------------------------------------------


def test_float32_smoke():
    prob = testing.quadratic_problem(seed=0, dtype=torch.float32)
    A = prob.extras["A"]
    lr = 1.0 / float(torch.linalg.eigvalsh(A.double()).max())
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    step = hg.gradient_step(prob.inner_loss, lr=lr)
    p = hg.unroll(step, hg.tree.zeros_like(prob.params), h, 200, truncate=150, checkpoint_every=50)
    prob.outer_loss(p, h).backward()
    assert p["x"].dtype == torch.float32 and h["h"].grad.dtype == torch.float32
    assert testing.compare(h["h"].grad, prob.hypergrad["h"]).rel_error < 1e-3


@pytest.mark.slow
def test_very_long_unroll_matches_ift_to_1e_8():
    prob = problems.problem("quadratic_cond1e3")
    lr = 1.0 / float(torch.linalg.eigvalsh(prob.extras["A"]).max())
    ift = hg.implicit_grad(
        prob.inner_loss,
        prob.outer_loss,
        prob.params,
        prob.hparams,
        solver=functools.partial(hg.cg, tol=1e-13, maxiter=500),
    )
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    p = hg.unroll(
        hg.gradient_step(prob.inner_loss, lr=lr),
        hg.tree.zeros_like(prob.params),
        h,
        25_000,
        checkpoint_every=500,
    )
    prob.outer_loss(p, h).backward()
    assert testing.compare(h["h"].grad, ift["h"]).rel_error < 1e-8


# ---- NaN/inf and malformed steps are named (issue 13.4) --------------------------------------


@pytest.mark.parametrize("truncate, checkpoint_every", [(None, None), (8, None), (None, 3),
                                                        (6, 4)])
def test_a_diverging_unroll_names_the_first_non_finite_step(truncate, checkpoint_every):
    """lr = 1e200 on f = 0.5 p^T A p: the iterate is ~1e200 after one step and overflows to
    inf at the second (p_t grows like (lr lambda)^t)."""
    prob, *_ = quad(seed=1)
    h = hg.tree.detach(prob.hparams, requires_grad=True)
    p0 = hg.tree.map(torch.ones_like, prob.params)
    with torch.no_grad():  # the first step at which the reference unroll is non-finite
        p, first = p0, None
        for t in range(10):
            p = hg.gradient_step(prob.inner_loss, lr=1e200)(p, prob.hparams, t)
            if first is None and not hg.tree.all_finite(p):
                first = t
    assert first == 1
    with pytest.raises(FloatingPointError, match=f"NaN/inf at step t={first} .*leaf 0"):
        hg.unroll(hg.gradient_step(prob.inner_loss, lr=1e200), p0, h, 10, truncate=truncate,
                  checkpoint_every=checkpoint_every)


def test_a_step_that_produces_nan_later_is_named_at_that_step():
    def step(p, h, t):
        return {"x": p["x"] * (float("nan") if t == 4 else 1.0), "y": p["y"] + h}

    p0 = {"x": torch.ones(2), "y": torch.zeros(3)}
    with pytest.raises(FloatingPointError, match=r"t=4 \(leaf 0 of the state, shape \(2,\)\)"):
        hg.unroll(step, p0, torch.ones(3), 7)
    assert hg.unroll(step, p0, torch.ones(3), 4)["y"].tolist() == [4.0, 4.0, 4.0]


def test_a_non_finite_start_is_named_as_params():
    with pytest.raises(ValueError, match="`params` leaf 1 .*NaN/inf"):
        hg.unroll(lambda p, h, t: p, [torch.ones(2), torch.tensor([1.0, float("inf")])], None, 3)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda p: p.float(), TypeError, "dtype of leaf 0.*t=2.*float64 -> torch.float32"),
    (lambda p: torch.cat([p, p]), ValueError, r"shape of leaf 0.*t=2.*\(3,\) -> \(6,\)"),
])
def test_a_step_that_changes_a_leaf_dtype_or_shape_raises(bad, exc, match):
    def step(p, h, t):
        return bad(p) if t == 2 else p

    with pytest.raises(exc, match=match):
        hg.unroll(step, torch.zeros(3), None, 5)
