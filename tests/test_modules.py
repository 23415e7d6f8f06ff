"""FunctionalModule: selection, buffer policy, and a BatchNorm CNN through implicit_grad and
MetaPretrainer, against hand-written ``torch.func.functional_call`` versions of the same losses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hypergrad as hg
from hypergrad import tree


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.bn(self.conv(x)))
        return self.head(F.avg_pool2d(z, 2).flatten(1))


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(3, (n,), generator=g)
    return x, y


def _net() -> CNN:
    torch.manual_seed(0)
    return CNN().double()


def _snapshot(d: dict) -> dict:
    return {k: v.detach().clone() for k, v in d.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- selection -----------------------------------------------------------------------------------
def test_selection_by_name_glob_and_list():
    net = _net()
    fm = hg.FunctionalModule(net, params=["head.*", "bn.weight"], hparams="conv.weight",
                             buffers="bn.running_*")
    assert list(fm.params) == ["bn.weight", "head.weight", "head.bias"]
    assert list(fm.hparams) == ["conv.weight"]
    assert list(fm.buffers) == ["bn.running_mean", "bn.running_var"]
    assert "conv.bias" in repr(fm) or "frozen" in repr(fm)
    for k, v in fm.params.items():
        assert v.data_ptr() != dict(net.named_parameters())[k].data_ptr()  # copies


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"params": "nope.*"}, "`params` pattern 'nope.*' matches none"),
        ({"params": "*", "hparams": "typo"}, "`hparams` pattern 'typo'"),
        ({"params": "head.*", "buffers": "bn.nothing"}, "`buffers` pattern"),
        ({"params": "head.*", "hparams": ["head.bias"]}, "overlap on \\['head.bias'\\]"),
        ({"params": []}, "`params` must select at least one"),
        ({"params": None}, "`params` must select at least one"),
        ({"params": "*", "inner": "training"}, "`inner` must be 'train' or 'eval'"),
        ({"params": "*", "outer": True}, "`outer` must be"),
    ],
)
def test_bad_selection_is_refused_with_the_argument_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hg.FunctionalModule(_net(), **kwargs)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="`module` must be a torch.nn.Module"):
        hg.FunctionalModule(lambda x: x, params="*")
    with pytest.raises(TypeError, match="`params` must be a name"):
        hg.FunctionalModule(_net(), params=3)
    fm = hg.FunctionalModule(_net(), params="head.*", hparams="conv.*")
    x, _ = _data(4, 0)
    with pytest.raises(ValueError, match="`params` must be a dict with exactly"):
        fm.inner(fm.hparams, fm.params, x)
    with pytest.raises(ValueError, match="missing \\['conv.weight', 'conv.bias'\\]"):
        fm.inner(fm.params, {"l2": torch.zeros(())}, x)


# --- modes and the buffer policy -----------------------------------------------------------------
def test_levels_run_in_their_modes_and_restore_the_modules_flags():
    net = _net()
    x, _ = _data(16, 1)
    fm = hg.FunctionalModule(net, params="*")
    fm.update_buffers(fm.params, None, x)  # non-trivial running statistics
    net.train()
    ref = copy.deepcopy(net)
    for (n, b) in ref.named_buffers():
        b.copy_(fm.buffers[n])
    with torch.no_grad():
        torch.testing.assert_close(fm.outer(fm.params, None, x), ref.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(fm.inner(fm.params, None, x),
                                   copy.deepcopy(ref).train()(x), rtol=0, atol=0)
    assert net.training and all(m.training for m in net.modules())
    net.eval()
    fm.inner(fm.params, None, x)
    assert not any(m.training for m in net.modules())


def test_running_statistics_change_only_when_tracking():
    net = _net()
    own = _snapshot(dict(net.named_buffers()))
    x, _ = _data(16, 2)
    fm = hg.FunctionalModule(net, params="*")
    before = _snapshot(fm.buffers)
    fm.inner(fm.params, None, x)
    fm.outer(fm.params, None, x)
    assert _same(fm.buffers, before)
    with fm.tracking():
        fm.outer(fm.params, None, x)  # eval mode: nothing to commit
        assert _same(fm.buffers, before)
        fm.inner(fm.params, None, x)
    assert not torch.equal(fm.buffers["bn.running_mean"], before["bn.running_mean"])
    assert int(fm.buffers["bn.num_batches_tracked"]) == 1
    assert _same(dict(net.named_buffers()), own)  # the module's own buffers never move
    fm.to_module(fm.params)
    assert torch.equal(net.bn.running_mean, fm.buffers["bn.running_mean"])


def test_unselected_buffers_are_frozen():
    net = _net()
    x, _ = _data(8, 3)
    fm = hg.FunctionalModule(net, params="*", buffers=())
    assert fm.buffers == {}
    with fm.tracking():
        fm.inner(fm.params, None, x)
    assert float(net.bn.running_mean.abs().sum()) == 0


# --- a BatchNorm CNN through implicit_grad -------------------------------------------------------
def _fit(inner_loss, params: dict, hparams: dict) -> dict:
    """L-BFGS to a stationary point (gradient norm ~1e-7 here: enough for the IFT premise)."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.LBFGS(list(p.values()), lr=1, max_iter=300, tolerance_grad=1e-12,
                            tolerance_change=0, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = inner_loss(p, hparams)
        loss.backward()
        return loss

    opt.step(closure)
    return {k: v.detach() for k, v in p.items()}


def _bilevel(fm_or_hand):
    x_tr, y_tr = _data(24, 10)
    x_va, y_va = _data(20, 11)

    def inner_loss(p, h):
        logits = fm_or_hand("inner", p, h, x_tr)
        ce = F.cross_entropy(logits, y_tr, reduction="none")
        decay = 0.5 * h["l2"].exp() * sum((v**2).sum() for v in p.values())
        return (2 * torch.sigmoid(h["w"]) * ce).mean() + decay

    def outer_loss(p, h):
        return F.cross_entropy(fm_or_hand("outer", p, h, x_va), y_va)

    return inner_loss, outer_loss, x_tr


def test_cnn_with_batchnorm_through_implicit_grad_equals_hand_written_functional_call():
    net = _net()
    fm = hg.FunctionalModule(net, params="*")
    x_tr, _ = _data(24, 10)
    with fm.tracking():  # a few real training-mode forwards: non-trivial running statistics
        for _ in range(3):
            fm.inner(fm.params, None, x_tr + 0.3)
    calls: list[dict] = []

    def via_fm(level, p, h, x):
        calls.append(_snapshot(fm.buffers))
        return (fm.inner if level == "inner" else fm.outer)(p, h, x)

    bufs = _snapshot(fm.buffers)  # the hand-written version's state: the same statistics

    def by_hand(level, p, h, x):
        net.train(level == "inner")
        return functional_call(net, {**p, **{k: v.clone() for k, v in bufs.items()}}, (x,))

    h = {"l2": torch.tensor(-1.0), "w": 0.5 * torch.randn(24)}
    inner_fm, outer_fm, _ = _bilevel(via_fm)
    inner_hand, outer_hand, _ = _bilevel(by_hand)
    params = _fit(inner_hand, fm.params, h)
    before = _snapshot(fm.buffers)
    g_fm, info = hg.implicit_grad(inner_fm, outer_fm, params, h, return_info=True)
    g_hand = hg.implicit_grad(inner_hand, outer_hand, params, h)
    assert info["trusted"]
    for k in h:
        torch.testing.assert_close(g_fm[k], g_hand[k], rtol=1e-12, atol=1e-15)
    assert float(tree.norm(g_fm)) > 0
    # running statistics fixed through the loss calls, the Hessian products and the solve
    assert calls and all(_same(c, before) for c in calls)
    assert _same(fm.buffers, before)
    # the outer level really reads them: other statistics give another hypergradient
    fm.buffers = {**before, "bn.running_mean": before["bn.running_mean"] + 1.0}
    g_other = hg.implicit_grad(inner_fm, outer_fm, params, h, stationarity_tol=None)
    assert not torch.allclose(g_other["w"], g_fm["w"])


def test_naive_functional_call_in_train_mode_would_move_the_statistics():
    """The failure the policy prevents: passing the module's buffers themselves to
    ``functional_call`` in train mode updates them at every evaluation of the loss."""
    net = _net()
    x, y = _data(12, 4)
    before = net.bn.running_mean.clone()

    def naive(p, h):
        net.train()
        return F.cross_entropy(functional_call(net, {**p, **dict(net.named_buffers())}, (x,)), y)

    p = {k: v.detach() for k, v in net.named_parameters()}
    hg.hvp(lambda q: naive(q, None), p, tree.map(torch.ones_like, p))
    assert not torch.equal(net.bn.running_mean, before)


# --- a BatchNorm CNN through MetaPretrainer ------------------------------------------------------
def _pt_data():
    x, y = _data(32, 20)
    xf, yf = _data(16, 21)
    return x, y, xf, yf


def _trainer_pair(track: bool):
    x, y, xf, yf = _pt_data()
    net_a, net_b = _net(), _net()
    fm = hg.FunctionalModule(net_a, params="*")
    bufs_b = _snapshot(dict(net_b.named_buffers()))  # the hand-written version's state
    real_step = {"on": False}

    def pt_fm(p, h, idx):
        return F.cross_entropy(fm.inner(p, h, x[idx]), y[idx]) + _decay(p, h)

    def ft_fm(enc, head, idx):
        return F.cross_entropy(fm.outer(enc, None, xf[idx]) + head["bias"], yf[idx])

    def pt_hand(p, h, idx):
        net_b.train()
        bufs = bufs_b if real_step["on"] else {k: v.clone() for k, v in bufs_b.items()}
        out = functional_call(net_b, {**p, **bufs}, (x[idx],))
        return F.cross_entropy(out, y[idx]) + _decay(p, h)

    def ft_hand(enc, head, idx):
        net_b.eval()
        out = functional_call(net_b, {**enc, **bufs_b}, (xf[idx],))
        return F.cross_entropy(out + head["bias"], yf[idx])

    class FMTrainer(hg.MetaPretrainer):
        def pt_step(self, batch):
            if not track:
                return super().pt_step(batch)
            with fm.tracking():
                return super().pt_step(batch)

    class HandTrainer(hg.MetaPretrainer):
        def pt_step(self, batch):
            real_step["on"] = track
            try:
                return super().pt_step(batch)
            finally:
                real_step["on"] = False

    def make(cls, pt, ft, params):
        return cls(pt_loss=pt, ft_loss=ft, pt_params=params,
                   ft_head={"bias": torch.zeros(3)}, hparams={"l2": torch.tensor(-3.0)},
                   P=2, K=1, ft_lr=0.1,
                   pt_optimizer=lambda ts: torch.optim.Adam(ts, lr=1e-2),
                   meta_optimizer=lambda ts: torch.optim.SGD(ts, lr=1.0))

    a = make(FMTrainer, pt_fm, ft_fm, fm.params)
    b = make(HandTrainer, pt_hand, ft_hand, {k: v.detach() for k, v in net_b.named_parameters()})
    return a, b, fm, bufs_b


def _decay(p, h):
    return 0.5 * h["l2"].exp() * sum((v**2).sum() for v in p.values())


def _batches():
    pt = lambda i: torch.arange(8) + 8 * (i % 4)  # noqa: E731
    return pt, lambda j: (torch.arange(8), torch.arange(8) + 8)


@pytest.mark.parametrize("track", [True, False])
def test_cnn_with_batchnorm_through_meta_pretrainer_equals_hand_written(track):
    a, b, fm, bufs_b = _trainer_pair(track)
    initial = _snapshot(fm.buffers)
    pt_fn, ft_fn = _batches()
    ha = a.run(3, pt_fn, ft_fn, progress=False)
    hb = b.run(3, pt_fn, ft_fn, progress=False)
    assert [m["val_loss"] for m in ha] == pytest.approx([m["val_loss"] for m in hb], rel=1e-12)
    torch.testing.assert_close(a.hparams["l2"], b.hparams["l2"], rtol=1e-12, atol=0)
    assert float(a.hparams["l2"].detach()) != -3.0  # the meta steps moved phi
    for k in a.pt_params:
        torch.testing.assert_close(a.pt_params[k], b.pt_params[k], rtol=1e-12, atol=1e-14)
    for k in fm.buffers:
        torch.testing.assert_close(fm.buffers[k], bufs_b[k], rtol=1e-12, atol=0)
    # tracking: the 6 real PT steps (and only they) moved the statistics; otherwise nothing did
    moved = int(fm.buffers["bn.num_batches_tracked"]) - int(initial["bn.num_batches_tracked"])
    assert moved == (6 if track else 0)
    assert _same(fm.buffers, initial) == (not track)
