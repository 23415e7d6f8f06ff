"""Specification of the two-stage hypergradient (Raghu et al. 2021, Algorithm 1)."""

from __future__ import annotations

import functools

import pytest
import torch

import hypergrad as hg
from hypergrad import testing

D = torch.float64


def _problem(seed: int, n: int = 5, n_pt_head: int = 2):
    """PT: quadratic in (encoder w, PT head a) with per-coordinate weights exp(phi);
    FT: linear regression with features x @ w and a scalar head (s, c)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(40, n, generator=g, dtype=D)
    Y = torch.randn(40, n_pt_head, generator=g, dtype=D)
    Xf = torch.randn(30, n, generator=g, dtype=D)
    yf = torch.randn(30, generator=g, dtype=D)
    Xv = torch.randn(20, n, generator=g, dtype=D)
    yv = torch.randn(20, generator=g, dtype=D)
    phi = 0.3 * torch.randn(n, generator=g, dtype=D)

    def pt_loss(p, h):
        pred = (X * p["w"]) @ p["a"]  # bilinear in (w, a): not a plain quadratic
        return ((pred - Y.sum(1)) ** 2).mean() + 0.5 * (h["phi"].exp() * (p["w"] - 1) ** 2).sum() \
            + 0.5 * (p["a"] ** 2).sum()

    def ft(Xs, ys):
        return lambda e, hd: ((torch.tanh(Xs @ e["w"]) * hd["s"] + hd["c"] - ys) ** 2).mean()

    # Exact PT optimum by Newton's method on the joint (w, a).
    p = {"w": torch.ones(n, dtype=D), "a": 0.1 * torch.ones(n, dtype=D)}
    vec = torch.cat([p["w"], p["a"]])
    for _ in range(50):
        f = lambda v: pt_loss({"w": v[:n], "a": v[n:]}, {"phi": phi})  # noqa: E731
        vec = vec - torch.linalg.solve(torch.func.hessian(f)(vec), torch.func.grad(f)(vec))
    p = {"w": vec[:n].clone(), "a": vec[n:].clone()}
    head = {"s": torch.tensor(0.7, dtype=D), "c": torch.tensor(0.1, dtype=D)}
    return pt_loss, ft(Xf, yf), ft(Xv, yv), p, head, {"phi": phi}


def _reference(pt_loss, ft_loss, val_loss, p, head, hparams, K, lr, head_only):
    """Dense IFT Jacobian composed with the exact Jacobian of K explicit FT steps."""
    n = p["w"].numel()
    H = testing.dense_hessian(pt_loss, p, hparams)
    M = testing.dense_mixed(pt_loss, p, hparams)
    dtheta_dphi = -torch.linalg.solve(H, M)  # (2n) x n_phi

    def after_ft(vec):
        enc = {"w": vec[:n]}
        hd = dict(head)
        for _ in range(K):
            gh = torch.autograd.grad(ft_loss(enc, hd), list(hd.values()) + ([] if head_only else
                                     [enc["w"]]), create_graph=True)
            hd = {k: v - lr * gi for (k, v), gi in zip(hd.items(), gh)}
            if not head_only:
                enc = {"w": enc["w"] - lr * gh[-1]}
        return val_loss(enc, hd)

    vec = torch.cat([p["w"], p["a"]]).requires_grad_(True)
    head = {k: v.clone().requires_grad_(True) for k, v in head.items()}
    (gtheta,) = torch.autograd.grad(after_ft(vec), vec)
    return dtheta_dphi.T @ gtheta


@pytest.mark.parametrize("K", [0, 1, 2, 3])
@pytest.mark.parametrize("head_only", [True, False])
def test_matches_dense_ift_composed_with_exact_ft_unroll(K, head_only):
    pt_loss, ft_loss, val_loss, p, head, h = _problem(seed=K + 10 * head_only)
    lr = 0.3
    res = hg.pretraining_hypergrad(
        pt_loss, ft_loss, val_loss, p, head, h,
        encoder=lambda t: {"w": t["w"]}, ft_steps=K, ft_lr=lr, head_only=head_only,
        solver=functools.partial(hg.cg, tol=1e-13, maxiter=100),
    )
    ref = _reference(pt_loss, ft_loss, val_loss, p, head, h, K, lr, head_only)
    cmp = testing.compare(res.hypergrad["phi"], ref)
    assert cmp.rel_error < 1e-6, cmp
    assert bool(res.info["solve"].converged)


def test_ft_head_returned_is_the_head_after_K_steps():
    pt_loss, ft_loss, val_loss, p, head, h = _problem(seed=3)
    res = hg.pretraining_hypergrad(pt_loss, ft_loss, val_loss, p, head, h,
                                   encoder=lambda t: {"w": t["w"]}, ft_steps=2, ft_lr=0.1)
    hd = {k: v.clone().requires_grad_(True) for k, v in head.items()}
    for _ in range(2):
        g = torch.autograd.grad(ft_loss({"w": p["w"]}, hd), list(hd.values()))
        hd = {k: (v - 0.1 * gi).detach().requires_grad_(True) for (k, v), gi in zip(hd.items(), g)}
    for k in head:
        torch.testing.assert_close(res.ft_head[k], hd[k].detach())
        assert not res.ft_head[k].requires_grad
    assert torch.isclose(res.val_loss, val_loss({"w": p["w"]}, res.ft_head))


def test_neumann_default_is_close_to_exact_on_well_conditioned_problem():
    pt_loss, ft_loss, val_loss, p, head, h = _problem(seed=5)
    exact = hg.pretraining_hypergrad(pt_loss, ft_loss, val_loss, p, head, h,
                                     encoder=lambda t: {"w": t["w"]},
                                     solver=functools.partial(hg.cg, tol=1e-13))
    approx = hg.pretraining_hypergrad(
        pt_loss, ft_loss, val_loss, p, head, h, encoder=lambda t: {"w": t["w"]},
        solver=functools.partial(hg.neumann, iterations=200, alpha="auto"))
    assert testing.compare(approx.hypergrad, exact.hypergrad).rel_error < 1e-4


def test_does_not_touch_inputs_or_grads():
    pt_loss, ft_loss, val_loss, p, head, h = _problem(seed=6)
    h = {"phi": h["phi"].clone().requires_grad_(True)}
    before = {k: v.clone() for k, v in head.items()}
    hg.pretraining_hypergrad(pt_loss, ft_loss, val_loss, p, head, h,
                             encoder=lambda t: {"w": t["w"]})
    assert h["phi"].grad is None
    for k in head:
        assert torch.equal(head[k], before[k])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ft_steps": -1}, "ft_steps"),
        ({"ft_lr": 0.0}, "`ft_lr`"),
        ({"ft_lr": float("nan")}, "`ft_lr`"),
        ({"head_only": "yes"}, "`head_only`"),
        ({"solver": 3}, "`solver`"),
        ({"on_failure": "loud"}, "`on_failure`"),
        ({"stationarity_tol": -1.0}, "`stationarity_tol`"),
        ({"encoder": 3}, "encoder"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    pt_loss, ft_loss, val_loss, p, head, h = _problem(seed=7)
    with pytest.raises((ValueError, TypeError), match=match):
        hg.pretraining_hypergrad(pt_loss, ft_loss, val_loss, p, head, h, **kwargs)


def test_non_callable_losses_are_named():
    _, ft_loss, val_loss, p, head, h = _problem(seed=8)
    with pytest.raises(TypeError, match="pt_loss"):
        hg.pretraining_hypergrad(None, ft_loss, val_loss, p, head, h)


def _call(**overrides):
    pt_loss, ft_loss, val_loss, p, head, h = _problem(seed=9)
    args = dict(pt_loss=pt_loss, ft_loss=ft_loss, val_loss=val_loss, pt_params=p, ft_head=head,
                hparams=h)
    args.update(overrides)
    return hg.pretraining_hypergrad(args.pop("pt_loss"), args.pop("ft_loss"),
                                    args.pop("val_loss"), args.pop("pt_params"),
                                    args.pop("ft_head"), args.pop("hparams"),
                                    encoder=lambda t: {"w": t["w"]}, **args)


@pytest.mark.parametrize("which", ["pt_params", "ft_head", "hparams"])
def test_errors_name_the_trees_as_the_caller_spelled_them(which):
    _, _, _, p, head, h = _problem(seed=9)
    tree = {"pt_params": p, "ft_head": head, "hparams": h}[which]
    with pytest.raises(ValueError, match=f"`{which}` must be a non-empty"):
        _call(**{which: {}})
    nan = {k: v.clone() for k, v in tree.items()}
    key = list(nan)[-1]
    nan[key] = nan[key] * float("nan")
    with pytest.raises(ValueError, match=f"`{which}` leaf '{key}'.*NaN or inf"):
        _call(**{which: nan})
    ints = {k: v.to(torch.int64) for k, v in tree.items()}
    with pytest.raises(TypeError, match=f"`{which}` must hold floating-point"):
        _call(**{which: ints})


@pytest.mark.parametrize("which", ["ft_head", "hparams"])
def test_a_float32_tree_with_float64_params_is_refused_not_promoted(which):
    _, _, _, p, head, h = _problem(seed=9)
    tree = {"ft_head": head, "hparams": h}[which]
    f32 = {k: v.float() for k, v in tree.items()}
    with pytest.raises(TypeError, match=f"`{which}` leaf .* torch.float32 .* `pt_params` leaf "
                                        "'w' is torch.float64.*cast"):
        _call(**{which: f32})


def test_non_scalar_losses_are_named():
    pt_loss, ft_loss, val_loss, p, head, h = _problem(seed=9)
    for name, bad in (("pt_loss", lambda a, b: pt_loss(a, b) * torch.ones(2, dtype=D)),
                      ("ft_loss", lambda a, b: ft_loss(a, b) * torch.ones(2, dtype=D)),
                      ("val_loss", lambda a, b: val_loss(a, b) * torch.ones(2, dtype=D))):
        with pytest.raises(ValueError, match=f"`{name}` must return a scalar"):
            _call(**{name: bad}).hypergrad["phi"].sum()


# --- the first-order FT unroll (products="finite_difference") --------------------------------
class _SigmoidNoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("derivative for _SigmoidNoBackward is not implemented")


class _OnceSoftplus(torch.autograd.Function):
    """softplus whose backward has no derivative (like SDPA's fused CPU kernel)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.softplus(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * _SigmoidNoBackward.apply(x)


@pytest.mark.parametrize("head_only", [True, False])
@pytest.mark.parametrize("K", [1, 3])
def test_first_order_unroll_matches_the_exact_unroll_without_double_backward(head_only, K):
    from hypergrad.pretraining import _first_order_unroll

    g = torch.Generator().manual_seed(K)
    X, Xv = torch.randn(30, 4, generator=g, dtype=D), torch.randn(20, 4, generator=g, dtype=D)
    y, yv = torch.randn(30, generator=g, dtype=D), torch.randn(20, generator=g, dtype=D)

    def loss(Xs, ys, act):
        return lambda e, hd: ((act(Xs @ e["w"]) * hd["s"] + hd["c"] - ys) ** 2).mean()

    enc = {"w": torch.randn(4, generator=g, dtype=D).requires_grad_(True)}
    head = {"s": torch.tensor(0.7, dtype=D, requires_grad=True),
            "c": torch.tensor(0.1, dtype=D, requires_grad=True)}
    smooth = torch.nn.functional.softplus
    if head_only:
        step = hg.gradient_step(lambda hd, e: loss(X, y, smooth)(e, hd), 0.3)
        ek, hk = enc, hg.unroll(step, head, enc, K)
    else:
        step = hg.gradient_step(lambda s, _: loss(X, y, smooth)(*s), 0.3)
        ek, hk = hg.unroll(step, (enc, head), (), K)
    inputs = [enc["w"], head["s"], head["c"]]
    exact = torch.autograd.grad(loss(Xv, yv, smooth)(ek, hk), inputs)
    once = _OnceSoftplus.apply
    ek2, hk2 = _first_order_unroll(loss(X, y, once), enc, head, K, 0.3, head_only)
    fd = torch.autograd.grad(loss(Xv, yv, once)(ek2, hk2), inputs)
    for a, b in zip(exact, fd):
        assert float((a - b).norm() / a.norm()) < 1e-6
    if not head_only:  # the exact unroll needs d/dw of the encoder's backward: it cannot
        step = hg.gradient_step(lambda s, _: loss(X, y, once)(*s), 0.3)
        with pytest.raises(RuntimeError, match="not implemented"):
            torch.autograd.grad(loss(Xv, yv, once)(*hg.unroll(step, (enc, head), (), K)),
                                inputs)


@pytest.mark.parametrize("head_only", [True, False])
def test_finite_difference_products_give_the_exact_hypergradient_to_fd_accuracy(head_only):
    pt_loss, ft_loss, val_loss, p, head, h = _problem(seed=21)
    kw = dict(encoder=lambda t: {"w": t["w"]}, ft_steps=2, ft_lr=0.3, head_only=head_only,
              solver=functools.partial(hg.cg, tol=1e-12, maxiter=100))
    exact = hg.pretraining_hypergrad(pt_loss, ft_loss, val_loss, p, head, h, **kw)
    fd = hg.pretraining_hypergrad(pt_loss, ft_loss, val_loss, p, head, h,
                                  products="finite_difference", **kw)
    assert testing.compare(fd.hypergrad["phi"], exact.hypergrad["phi"]).rel_error < 1e-6
    for k in head:
        torch.testing.assert_close(fd.ft_head[k], exact.ft_head[k])


def test_finite_difference_products_need_no_double_backward():
    """An encoder whose backward has no derivative: the exact path cannot, FD can, and it
    agrees with the exact hypergradient of the same model built from differentiable ops."""
    g = torch.Generator().manual_seed(3)
    X, Xf, Xv = (torch.randn(n, 4, generator=g, dtype=D) for n in (40, 30, 20))
    Y, yf, yv = (torch.randn(n, generator=g, dtype=D) for n in (40, 30, 20))

    def losses(act):
        def pt(p, h):
            return ((act(X @ p["w"]) * p["a"] - Y) ** 2).mean() + 0.5 * (
                h["phi"].exp() * p["w"] ** 2).sum()

        def ft(Xs, ys):
            return lambda e, hd: ((act(Xs @ e["w"]) * hd["s"] + hd["c"] - ys) ** 2).mean()

        return pt, ft(Xf, yf), ft(Xv, yv)

    p = {"w": 0.3 * torch.randn(4, generator=g, dtype=D), "a": torch.tensor(0.8, dtype=D)}
    head = {"s": torch.tensor(0.7, dtype=D), "c": torch.tensor(0.1, dtype=D)}
    h = {"phi": torch.zeros(4, dtype=D)}
    kw = dict(encoder=lambda t: {"w": t["w"]}, ft_steps=1, ft_lr=0.3, head_only=False,
              solver=functools.partial(hg.neumann, iterations=5, alpha=0.1))
    ref = hg.pretraining_hypergrad(*losses(torch.nn.functional.softplus), p, head, h, **kw)
    once = losses(_OnceSoftplus.apply)
    with pytest.raises((RuntimeError, hg.DoubleBackwardError)):
        hg.pretraining_hypergrad(*once, p, head, h, **kw)
    fd = hg.pretraining_hypergrad(*once, p, head, h, products="finite_difference", **kw)
    assert testing.compare(fd.hypergrad["phi"], ref.hypergrad["phi"]).rel_error < 1e-6


def test_meta_pretrainer_takes_products():
    pt_loss, ft_loss, val_loss, p, head, h = _problem(seed=22)
    with pytest.raises(ValueError, match="`products`"):
        hg.pretraining_hypergrad(pt_loss, ft_loss, val_loss, p, head, h, products="fd")
    tr = {m: hg.MetaPretrainer(pt_loss=lambda a, b, _: pt_loss(a, b),
                               ft_loss=lambda e, hd, which: (ft_loss if which else val_loss)(e, hd),
                               pt_params=p, ft_head=head, hparams=h,
                               encoder=lambda t: {"w": t["w"]}, products=m, P=1, K=1, ft_lr=0.1)
          for m in ("exact", "finite_difference")}
    hist = {m: t.run(2, lambda i: None, lambda j: (1, 0), progress=False) for m, t in tr.items()}
    for a, b in zip(hist["exact"], hist["finite_difference"]):
        assert a["hypergrad_norm"] == pytest.approx(b["hypergrad_norm"], rel=1e-5)
    with pytest.raises(ValueError, match="`products`"):
        hg.MetaPretrainer(pt_loss=lambda a, b, _: pt_loss(a, b), ft_loss=lambda *a: 0,
                          pt_params=p, ft_head=head, hparams=h, products="approx")


def test_fd_eps_reaches_every_finite_difference_product(monkeypatch):
    """``fd_eps=`` is the step of the IFT's products and of the FT unroll's backward alike, on
    pretraining_hypergrad and MetaPretrainer; with exact products it is refused by name."""
    pt_loss, ft_loss, val_loss, p, head, h = _problem(seed=23)
    seen = []
    internal = hg.FiniteDifferenceOperator._internal.__func__

    def spy(cls, fn, params, hparams, args=(), **kw):
        seen.append((kw.get("name"), kw.get("eps")))
        return internal(cls, fn, params, hparams, args, **kw)

    monkeypatch.setattr(hg.FiniteDifferenceOperator, "_internal", classmethod(spy))
    kw = dict(encoder=lambda t: {"w": t["w"]}, ft_steps=1, ft_lr=0.3,
              solver=functools.partial(hg.neumann, iterations=3, alpha=0.1))
    for head_only in (True, False):
        seen.clear()
        a = hg.pretraining_hypergrad(pt_loss, ft_loss, val_loss, p, head, h, head_only=head_only,
                                     products="finite_difference", fd_eps=1e-2, **kw)
        assert {n for n, _ in seen} == {"inner_loss", "ft_loss"} and all(
            e == 1e-2 for _, e in seen), seen
        b = hg.pretraining_hypergrad(pt_loss, ft_loss, val_loss, p, head, h, head_only=head_only,
                                     products="finite_difference", **kw)
        assert not torch.equal(a.hypergrad["phi"], b.hypergrad["phi"])  # another step
    seen.clear()
    tr = hg.MetaPretrainer(pt_loss=lambda a, b, _: pt_loss(a, b),
                           ft_loss=lambda e, hd, which: (ft_loss if which else val_loss)(e, hd),
                           pt_params=p, ft_head=head, hparams=h, encoder=lambda t: {"w": t["w"]},
                           products="finite_difference", fd_eps=1e-2, P=1, K=1, ft_lr=0.1)
    tr.run(1, lambda i: None, lambda j: (1, 0), progress=False)
    assert {n for n, _ in seen} == {"inner_loss", "ft_loss"} and all(e == 1e-2 for _, e in seen)
    with pytest.raises(ValueError, match='`fd_eps`.*products="finite_difference"'):
        hg.pretraining_hypergrad(pt_loss, ft_loss, val_loss, p, head, h, fd_eps=1e-2, **kw)
    with pytest.raises(ValueError, match="`fd_eps`"):
        hg.MetaPretrainer(pt_loss=lambda a, b, _: pt_loss(a, b), ft_loss=lambda *a: 0,
                          pt_params=p, ft_head=head, hparams=h, products="finite_difference",
                          fd_eps=-1.0)
