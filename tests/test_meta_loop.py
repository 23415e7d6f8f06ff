"""Specification of the online meta-pretraining loop (Algorithm 1) and its checkpoint/resume."""

from __future__ import annotations

import functools

import pytest
import torch

import hypergrad as hg


def _setup(seed: int = 0, dropout: bool = False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 6, generator=g)
    w_true = torch.randn(6, generator=g)
    y = X @ w_true
    noise = torch.randn(256, generator=g) * (torch.arange(6).repeat(43)[:256] < 3)

    def pt_loss(p, h, idx):
        w = torch.sigmoid(h["logit"])[idx % 6] * 2  # per-"task" weights, as in the PPI recipe
        z = X[idx] @ p["enc"]
        if dropout:  # global-RNG randomness, to check that resume restores the RNG state
            z = torch.nn.functional.dropout(z, 0.1)
        return (w * (z + p["b"] - y[idx] - noise[idx]) ** 2).mean()

    def ft_loss(e, hd, idx):
        return ((hd["s"] * (X[idx] @ e["enc"]) - y[idx]) ** 2).mean()

    def make():
        return hg.MetaPretrainer(
            pt_loss=pt_loss, ft_loss=ft_loss,
            pt_params={"enc": torch.zeros(6), "b": torch.zeros(())},
            ft_head={"s": torch.ones(())}, hparams={"logit": torch.zeros(6)},
            encoder=lambda p: {"enc": p["enc"]},
            pt_optimizer=lambda ts: torch.optim.Adam(ts, lr=0.05),
            meta_optimizer=lambda ts: torch.optim.Adam(ts, lr=0.1),
            P=3, K=1, ft_lr=0.05,
        )

    def pt_batch(i):
        return torch.randperm(256, generator=torch.Generator().manual_seed(1000 + i))[:32]

    def ft_batch(j):
        gj = torch.Generator().manual_seed(5000 + j)
        perm = torch.randperm(256, generator=gj)
        return perm[:32], perm[32:64]

    return make, pt_batch, ft_batch


@pytest.mark.parametrize("dropout", [False, True])
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, dropout):
    make, pt_batch, ft_batch = _setup(dropout=dropout)
    torch.manual_seed(0)
    full = make()
    full.run(8, pt_batch, ft_batch, progress=False)

    torch.manual_seed(0)
    ckpt = tmp_path / "run.pt"
    first = make()
    first.run(5, pt_batch, ft_batch, checkpoint=ckpt, checkpoint_every=1, progress=False)
    del first  # "killed" after 5 outer iterations
    torch.manual_seed(123)  # a fresh process would not share the RNG state
    resumed = make()
    hist = resumed.run(8, pt_batch, ft_batch, checkpoint=ckpt, progress=False)

    assert resumed.meta_steps_done == 8 and resumed.pt_steps_done == 24
    for name in ("pt_params", "ft_head", "hparams"):
        mine, theirs = getattr(full, name), getattr(resumed, name)
        for a, b in zip(hg.tree.leaves(mine), hg.tree.leaves(theirs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    strip = lambda h: [{k: v for k, v in m.items() if "time" not in k} for m in h]  # noqa: E731
    assert strip(hist) == strip(full.history)


def test_meta_steps_move_hparams_and_keep_ft_head_online():
    make, pt_batch, ft_batch = _setup()
    tr = make()
    h0 = tr.hparams["logit"].detach().clone()
    s0 = tr.ft_head["s"].detach().clone()
    hist = tr.run(4, pt_batch, ft_batch, progress=False)
    assert not torch.equal(tr.hparams["logit"], h0)
    assert not torch.equal(tr.ft_head["s"], s0)
    assert all(m["hypergrad_norm"] > 0 for m in hist)


def test_meta_false_is_plain_pretraining():
    make, pt_batch, ft_batch = _setup()
    tr = make()
    tr.meta = False
    h0 = tr.hparams["logit"].detach().clone()
    tr.run(3, pt_batch, ft_batch, progress=False)
    assert torch.equal(tr.hparams["logit"], h0)
    assert tr.pt_steps_done == 9
    # the same PT steps by hand
    make2, _, _ = _setup()
    ref = make2()
    for i in range(9):
        ref.pt_step(pt_batch(i))
    torch.testing.assert_close(ref.pt_params["enc"], tr.pt_params["enc"], rtol=0, atol=0)


def test_meta_step_equals_pretraining_hypergrad_then_optimizer_step():
    make, pt_batch, ft_batch = _setup()
    tr = make()
    for i in range(3):
        tr.pt_step(pt_batch(i))
    tr_, va_ = ft_batch(0)
    expected = hg.pretraining_hypergrad(
        lambda p, h: tr.pt_loss(p, h, pt_batch(2)),
        lambda e, hd: tr.ft_loss(e, hd, tr_), lambda e, hd: tr.ft_loss(e, hd, va_),
        tr.pt_params, tr.ft_head, tr.hparams, encoder=tr.encoder, ft_steps=1, ft_lr=0.05,
        solver=functools.partial(hg.neumann, iterations=3, alpha=0.05),
    )
    h_before = tr.hparams["logit"].detach().clone()
    tr.meta_step(pt_batch(2), tr_, va_)
    # first Adam step moves each coordinate by lr * sign(g) (up to eps)
    step = tr.hparams["logit"].detach() - h_before
    torch.testing.assert_close(step, -0.1 * torch.sign(expected.hypergrad["logit"]), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(tr.ft_head["s"].detach(), expected.ft_head["s"])


def test_diverging_ift_solve_fails_loudly_after_checkpointing(tmp_path):
    make, pt_batch, ft_batch = _setup()
    tr = make()
    tr.run(1, pt_batch, ft_batch, checkpoint=tmp_path / "c.pt", checkpoint_every=1,
           progress=False)
    tr.solver = functools.partial(hg.neumann, iterations=50, alpha=1e6)  # alpha >> 2/lambda_max
    with pytest.raises(hg.HypergradientError, match="diverged.*alpha"):
        tr.run(2, pt_batch, ft_batch, checkpoint=tmp_path / "c.pt", progress=False)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["meta_steps_done"] == 1


def test_residual_slightly_above_one_warns_but_trains():
    make, pt_batch, ft_batch = _setup()
    tr = make()

    def one_term(mv, b):  # report a residual of 1.5, as negative curvature would
        res = hg.neumann(mv, b, iterations=1, alpha=0.05)
        return res._replace(residual_norm=torch.tensor(1.5))

    tr.solver = one_term
    with pytest.warns(hg.HypergradientWarning, match="negative curvature"):
        hist = tr.run(2, pt_batch, ft_batch, progress=False)
    assert [m["solve_residual"] for m in hist] == [1.5, 1.5]
    tr.max_solve_residual = 1.2
    with pytest.raises(hg.HypergradientError, match="max_solve_residual=1.2"):
        tr.run(3, pt_batch, ft_batch, progress=False)


def test_non_finite_hypergradient_fails_loudly():
    make, pt_batch, ft_batch = _setup()
    tr = make()
    tr.ft_loss = lambda e, hd, idx: (e["enc"].sum() * float("inf")) ** 2
    with pytest.raises((ValueError, FloatingPointError), match="NaN or inf|non-finite"):
        tr.run(1, pt_batch, ft_batch, progress=False)


@pytest.mark.parametrize("kwargs, match", [({"P": 0}, "P"), ({"K": -1}, "K"),
                                           ({"ft_lr": -1.0}, "ft_lr")])
def test_bad_loop_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hg.MetaPretrainer(pt_loss=lambda p, h, b: p["a"].sum(), ft_loss=lambda e, h, b: 0,
                          pt_params={"a": torch.zeros(1)}, ft_head={"b": torch.zeros(1)},
                          hparams={"c": torch.zeros(1)}, **kwargs)


# --- Adam-preconditioned IFT ----------------------------------------------------------------
def test_adam_preconditioner_is_the_bias_corrected_adam_step_per_coordinate():
    g = torch.Generator().manual_seed(0)
    p = {"a": torch.randn(4, generator=g).requires_grad_(),
         "b": torch.randn(2, 3, generator=g).requires_grad_()}
    opt = torch.optim.Adam([p["a"], p["b"]], lr=0.1, betas=(0.8, 0.9), eps=1e-6)
    assert all(torch.equal(d, torch.ones_like(d)) for d in hg.adam_preconditioner(opt, p).values())
    v = {k: torch.zeros_like(x) for k, x in p.items()}
    for _ in range(3):
        opt.zero_grad()
        loss = (p["a"] ** 4).sum() + (torch.sin(p["b"]) * 3).sum()
        loss.backward()
        v = {k: 0.9 * v[k] + 0.1 * p[k].grad ** 2 for k in p}
        opt.step()
    d = hg.adam_preconditioner(opt, p)
    for k in p:
        torch.testing.assert_close(d[k], 1 / ((v[k] / (1 - 0.9**3)).sqrt() + 1e-6))


def test_adam_preconditioner_rejects_what_it_cannot_read():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Adam-like"):
        hg.adam_preconditioner(torch.optim.SGD([w], lr=0.1), {"w": w})
    with pytest.raises(ValueError, match="does not optimize"):
        hg.adam_preconditioner(torch.optim.Adam([w]), {"w": torch.zeros(3)})


def test_meta_step_hands_the_pt_adam_diagonal_to_the_solver():
    """ift_preconditioner='adam': the IFT solve receives adam_preconditioner of the PT optimizer
    as it is at the meta step, and the hypergradient changes accordingly."""
    make, pt_batch, ft_batch = _setup()
    seen = []

    def solver(matvec, b, preconditioner=None):
        seen.append(preconditioner)
        return hg.neumann(matvec, b, iterations=3, alpha=0.05, preconditioner=preconditioner)

    hist = {}
    for mode in (None, "adam"):
        tr = hg.MetaPretrainer(**{**_kwargs(make), "solver": solver, "ift_preconditioner": mode})
        hist[mode] = tr.run(2, pt_batch, ft_batch, progress=False)
        if mode == "adam":
            expected = hg.adam_preconditioner(tr.pt_opt, tr.pt_params)
            for k in expected:  # the last meta step came after the last PT step
                torch.testing.assert_close(seen[-1][k], expected[k])
            assert float(seen[-1]["enc"].max()) > 2.0  # far from plain GD's D = 1
    assert seen[0] is None and seen[1] is None
    assert hist["adam"][1]["hypergrad_norm"] != pytest.approx(hist[None][1]["hypergrad_norm"])
    # ift_solver() is the solver the next meta step uses (what diagnostics should call)
    seen.clear()
    tr.ift_solver()(lambda v: v, {k: torch.ones_like(x) for k, x in tr.pt_params.items()})
    for k, d in hg.adam_preconditioner(tr.pt_opt, tr.pt_params).items():
        torch.testing.assert_close(seen[-1][k], d)
    plain = hg.MetaPretrainer(**{**_kwargs(make), "solver": solver})
    assert plain.ift_solver() is solver


def _kwargs(make):
    """The constructor arguments of _setup's trainer (to rebuild it with other options)."""
    tr = make()
    return dict(pt_loss=tr.pt_loss, ft_loss=tr.ft_loss, pt_params=tr.pt_params,
                ft_head=tr.ft_head, hparams=tr.hparams, encoder=tr.encoder,
                pt_optimizer=lambda ts: torch.optim.Adam(ts, lr=0.05),
                meta_optimizer=lambda ts: torch.optim.Adam(ts, lr=0.1), P=3, K=1, ft_lr=0.05)


def test_ift_preconditioner_needs_a_solver_that_takes_one():
    make, _, _ = _setup()
    with pytest.raises(ValueError, match="`preconditioner` argument"):
        hg.MetaPretrainer(**{**_kwargs(make), "solver": lambda mv, b: hg.cg(mv, b),
                             "ift_preconditioner": "adam"})
    with pytest.raises(ValueError, match="`ift_preconditioner` must be"):
        hg.MetaPretrainer(**{**_kwargs(make), "ift_preconditioner": "rmsprop"})
    # the default solver (Neumann, alpha = PT lr) takes one
    hg.MetaPretrainer(**{**_kwargs(make), "ift_preconditioner": "adam"})


# --- checkpoints: weights_only loading and one clear error ----------------------------------
class _Payload:
    """Unpickling this object would create ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _ckpt(tmp_path, make, pt_batch, ft_batch):
    path = tmp_path / "run.pt"
    make().run(2, pt_batch, ft_batch, checkpoint=path, checkpoint_every=1, progress=False)
    return path


def test_a_planted_pickle_payload_does_not_run_on_resume(tmp_path):
    make, pt_batch, ft_batch = _setup()
    path = _ckpt(tmp_path, make, pt_batch, ft_batch)
    marker = tmp_path / "pwned"
    sd = torch.load(path, weights_only=True)
    sd["history"].append({"note": _Payload(marker)})
    torch.save(sd, path)
    torch.load(path, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(hg.CheckpointError, match="run.pt.*start fresh") as e:
        make().run(4, pt_batch, ft_batch, checkpoint=path, progress=False)
    assert not marker.exists()
    assert e.value.__suppress_context__  # one message, not a chained traceback


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_a_dict"])
def test_a_damaged_checkpoint_gives_one_clear_error(tmp_path, damage):
    make, pt_batch, ft_batch = _setup()
    path = _ckpt(tmp_path, make, pt_batch, ft_batch)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(hg.CheckpointError) as e:
        make().run(4, pt_batch, ft_batch, checkpoint=path, progress=False)
    msg = str(e.value)
    assert str(path) in msg and "start fresh" in msg and "\n" not in msg
    assert e.value.__cause__ is None
    assert e.value.__context__ is None or e.value.__suppress_context__


def test_a_checkpoint_of_another_trainer_is_named(tmp_path):
    make, pt_batch, ft_batch = _setup()
    path = _ckpt(tmp_path, make, pt_batch, ft_batch)
    other = hg.MetaPretrainer(**{**_kwargs(make), "pt_params": {"other": torch.zeros(3)},
                                 "encoder": None, "ft_loss": lambda e, hd, b: e["other"].sum()})
    with pytest.raises(hg.CheckpointError, match="does not fit this trainer.*start fresh"):
        other.run(4, pt_batch, ft_batch, checkpoint=path, progress=False)


# --- warm-up ---------------------------------------------------------------------------------
def _state(tr):
    return [x.detach().clone() for name in ("pt_params", "ft_head", "hparams")
            for x in hg.tree.leaves(getattr(tr, name))]


def _same(a, b):
    for x, y in zip(_state(a), _state(b)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _numbers(hist):
    return [{k: v for k, v in m.items() if "time" not in k and k != "warmup"} for m in hist]


def test_warmup_is_plain_pt_iterations_then_meta_steps_bit_for_bit():
    make, pt_batch, ft_batch = _setup(dropout=True)
    N, M = 3, 4
    torch.manual_seed(0)
    tr = make()
    seen = []
    hist = tr.run(M, pt_batch, ft_batch, warmup=N, progress=False,
                  callback=lambda j, m: seen.append((j, tr.in_warmup, m["warmup"])))
    # the reference: the same steps written out by hand
    torch.manual_seed(0)
    ref = make()
    for j in range(N + M):
        for _ in range(ref.P):
            b = pt_batch(ref.pt_steps_done)
            ref.pt_step(b)
        if j >= N:
            ref.meta_step(b, *ft_batch(j))
    _same(tr, ref)
    assert (tr.outer_steps_done, tr.meta_steps_done, tr.pt_steps_done) == (N + M, M, 3 * (N + M))
    assert [m["warmup"] for m in hist] == [True] * N + [False] * M
    assert all("hypergrad_norm" not in m for m in hist[:N])
    assert all("hypergrad_norm" in m for m in hist[N:])
    assert seen == [(j, j < N, j < N) for j in range(N + M)]
    assert not tr.in_warmup


def test_warmup_reproduces_the_old_two_call_recipe():
    """What tasks did before ``warmup=``: run(N) with meta off, then run(N + M) with meta on."""
    make, pt_batch, ft_batch = _setup(dropout=True)
    torch.manual_seed(0)
    new = make()
    new.run(4, pt_batch, ft_batch, warmup=2, progress=False)
    torch.manual_seed(0)
    old = make()
    old.meta = False
    old.run(2, pt_batch, ft_batch, progress=False)
    old.meta = True
    old.run(6, pt_batch, ft_batch, progress=False)
    _same(new, old)
    assert _numbers(new.history) == _numbers(old.history)


@pytest.mark.parametrize("kill_at", [1, 4])  # during the warm-up, and after it
def test_a_run_killed_in_or_after_warmup_resumes_exactly(tmp_path, kill_at):
    make, pt_batch, ft_batch = _setup(dropout=True)
    torch.manual_seed(0)
    full = make()
    full.run(3, pt_batch, ft_batch, warmup=3, progress=False)

    class Killed(Exception):
        pass

    def die(j, m):
        if j == kill_at:
            raise Killed

    ckpt = tmp_path / "run.pt"
    torch.manual_seed(0)
    with pytest.raises(Killed):
        make().run(3, pt_batch, ft_batch, warmup=3, checkpoint=ckpt, checkpoint_every=1,
                   progress=False, callback=die)
    assert torch.load(ckpt, weights_only=True)["outer_steps_done"] == kill_at
    torch.manual_seed(123)
    resumed = make()
    hist = resumed.run(3, pt_batch, ft_batch, warmup=3, checkpoint=ckpt, progress=False)
    _same(full, resumed)
    assert _numbers(hist) == _numbers(full.history)
    assert [m["warmup"] for m in hist] == [True] * 3 + [False] * 3
    with pytest.raises(hg.CheckpointError, match="warmup=3.*warmup=2"):
        make().run(3, pt_batch, ft_batch, warmup=2, checkpoint=ckpt, progress=False)


def test_warmup_with_meta_off_is_plain_pt_throughout():
    make, pt_batch, ft_batch = _setup()
    tr = make()
    tr.meta = False
    hist = tr.run(2, pt_batch, ft_batch, warmup=1, progress=False)
    assert tr.outer_steps_done == 3 and tr.meta_steps_done == 0 and tr.pt_steps_done == 9
    assert [m["warmup"] for m in hist] == [True, False, False]


def test_a_subclass_sees_in_warmup_during_warmup_pt_steps():
    make, pt_batch, ft_batch = _setup()
    flags = []

    class Spy(hg.MetaPretrainer):
        def pt_step(self, batch):
            flags.append(self.in_warmup)
            return super().pt_step(batch)

    Spy(**_kwargs(make)).run(1, pt_batch, ft_batch, warmup=1, progress=False)
    assert flags == [True] * 3 + [False] * 3


def test_bad_warmup_is_named():
    make, pt_batch, ft_batch = _setup()
    with pytest.raises(ValueError, match="`warmup`"):
        make().run(1, pt_batch, ft_batch, warmup=-1, progress=False)


# --- warm starts (AmIGO) ---------------------------------------------------------------------
def _spy_cg(calls):
    def solver(matvec, b, x0=None):
        calls.append({"b": hg.tree.detach(b), "x0": None if x0 is None else hg.tree.detach(x0)})
        res = hg.cg(matvec, b, x0=x0, tol=1e-10, maxiter=50)
        calls[-1]["x"] = hg.tree.detach(res.solution)
        return res

    return solver


def test_warm_start_begins_each_solve_at_the_previous_solution():
    make, pt_batch, ft_batch = _setup()
    calls = []
    tr = hg.MetaPretrainer(**{**_kwargs(make), "solver": _spy_cg(calls), "warm_start": True})
    tr.ift_solver()(lambda v: v, {k: torch.ones_like(v) for k, v in tr.pt_params.items()})
    assert calls.pop()["x0"] is None and tr._warm is None  # no side effect
    hist = tr.run(3, pt_batch, ft_batch, progress=False)
    assert calls[0]["x0"] is None
    assert [m["warm_started"] for m in hist] == [0.0, 1.0, 1.0]
    for prev, cur in zip(calls, calls[1:]):
        for k in prev["x"]:
            torch.testing.assert_close(cur["x0"][k], prev["x"][k], rtol=0, atol=0)
    # ift_solver() hands out the same warm start without recording anything
    n = len(calls)
    diag = tr.ift_solver()
    diag(lambda v: v, calls[-1]["b"])
    torch.testing.assert_close(calls[-1]["x0"]["enc"], calls[n - 1]["x"]["enc"], rtol=0, atol=0)
    assert tr._warm["x"]["enc"].equal(calls[n - 1]["x"]["enc"])


def test_warm_start_resets_when_the_right_hand_side_moved_too_far():
    make, pt_batch, ft_batch = _setup()
    calls = []
    tr = hg.MetaPretrainer(**{**_kwargs(make), "solver": _spy_cg(calls), "warm_start": True,
                              "warm_start_reset": 1e-9})  # any move of b is too far
    tr.run(3, pt_batch, ft_batch, progress=False)
    for c in calls[1:]:
        assert all(bool((v == 0).all()) for v in c["x0"].values())
    assert [m["warm_started"] for m in tr.history] == [0.0, 0.0, 0.0]


def test_warm_start_gives_the_same_hypergradients_up_to_the_solver_tolerance():
    make, pt_batch, ft_batch = _setup()
    hist = {}
    for warm in (False, True):
        tr = hg.MetaPretrainer(**{**_kwargs(make), "solver": _spy_cg([]), "warm_start": warm})
        hist[warm] = tr.run(4, pt_batch, ft_batch, progress=False)
    for a, b in zip(hist[False], hist[True]):
        assert a["hypergrad_norm"] == pytest.approx(b["hypergrad_norm"], rel=1e-6)


def test_warm_start_resumes_exactly(tmp_path):
    make, pt_batch, ft_batch = _setup()
    kw = {**_kwargs(make), "solver": functools.partial(hg.cg, maxiter=3), "warm_start": True}
    full = hg.MetaPretrainer(**kw)
    full.run(5, pt_batch, ft_batch, progress=False)
    ckpt = tmp_path / "w.pt"
    hg.MetaPretrainer(**kw).run(2, pt_batch, ft_batch, checkpoint=ckpt, progress=False)
    resumed = hg.MetaPretrainer(**kw)
    resumed.run(5, pt_batch, ft_batch, checkpoint=ckpt, progress=False)
    _same(full, resumed)
    assert _numbers(full.history) == _numbers(resumed.history)


def test_warm_start_needs_a_solver_with_x0():
    make, _, _ = _setup()
    with pytest.raises(ValueError, match="`warm_start=True` needs a solver with an `x0`"):
        hg.MetaPretrainer(**{**_kwargs(make), "solver": lambda mv, b: hg.cg(mv, b),
                             "warm_start": True})
    with pytest.raises(TypeError, match="`warm_start`"):
        hg.MetaPretrainer(**{**_kwargs(make), "warm_start": "yes"})


# --- host synchronisations (GPU readiness, counted on the CPU) -------------------------------
def _count_reads(fn):
    """Tensor -> Python conversions (each a device->host sync on a GPU) made while ``fn`` runs,
    by file; torch.optim's own (Adam's step counter lives on the CPU) are not counted."""
    import collections
    import os

    sites = collections.Counter()
    names = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def patched(name):
        def read(self, *a, **k):
            f = __import__("sys")._getframe(1).f_code.co_filename
            if f"torch{os.sep}optim" not in f:
                sites[os.path.basename(f)] += 1
            return originals[name](self, *a, **k)
        return read

    for n in names:
        setattr(torch.Tensor, n, patched(n))
    try:
        fn()
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)
    return sites


@pytest.mark.parametrize("warm", [False, True])
def test_a_meta_step_reads_the_device_once_and_a_pt_step_never(warm):
    """The meta step's own metrics, the last PT loss and the IFT backward's whole health check
    in one read (issue 17: at most 1 host synchronisation per meta step)."""
    make, pt_batch, ft_batch = _setup()
    tr = hg.MetaPretrainer(**{**_kwargs(make), "warm_start": warm})
    tr.run(1, pt_batch, ft_batch, progress=False)
    assert sum(_count_reads(lambda: tr.pt_step(pt_batch(0))).values()) == 0
    sites = _count_reads(lambda: tr.run(3, pt_batch, ft_batch, progress=False))
    assert sites == {"_checks.py": 2}, sites  # 2 outer iterations, one Health.read each
    assert all("solve_residual" in m and "pt_loss" in m for m in tr.history)
    plain = make()
    plain.meta = False
    sites = _count_reads(lambda: plain.run(2, pt_batch, ft_batch, progress=False))
    assert sites == {"meta_loop.py": 2}, sites  # one PT-loss read per outer iteration


def test_a_subclass_whose_pt_step_returns_a_float_still_runs():
    make, pt_batch, ft_batch = _setup()

    class Old(hg.MetaPretrainer):
        def pt_step(self, batch):
            return float(super().pt_step(batch))

    ref = make()
    ref.run(2, pt_batch, ft_batch, progress=False)
    hist = Old(**_kwargs(make)).run(2, pt_batch, ft_batch, progress=False)
    assert _numbers(hist) == _numbers(ref.history)


def test_warm_started_neumann_accumulates_to_the_exact_solve_on_a_fixed_spd_system():
    """AmIGO's premise: with the system fixed, each warm 2-term Neumann solve continues the
    series, so the residual falls geometrically while a cold 2-term solve stays put."""
    from hypergrad.meta_loop import _warm_solve

    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    H = Q @ torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)) @ Q.T
    b = {"x": torch.randn(5, generator=g, dtype=torch.float64)}

    def mv(v):
        return {"x": H @ v["x"]}

    solver = functools.partial(hg.neumann, iterations=2, alpha=0.15, exact_residual=True)
    warm, residuals = None, []
    for _ in range(80):  # residual (1 - 0.15)^(2 k): 5e-12 after 80 solves
        seen = {}
        res = _warm_solve(solver, warm, 1.0, seen, mv, b)
        warm = seen
        residuals.append(float(res.residual_norm))
    cold = float(solver(mv, b).residual_norm)
    assert residuals[0] == pytest.approx(cold)
    assert residuals[-1] < 1e-6 < cold
    exact = torch.linalg.solve(H, b["x"])
    torch.testing.assert_close(warm["x"]["x"], exact, rtol=1e-5, atol=1e-6)


# --- extra state in checkpoints (FunctionalModule buffers) -------------------------------------
def _bn_trainer(extra: bool):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh())
    fm = hg.FunctionalModule(net, params="*")
    X = torch.randn(48, 4, generator=torch.Generator().manual_seed(1))
    y = X @ torch.ones(4)

    def pt_loss(p, h, b):
        z = fm.inner(p, h, X[b])
        return ((z.sum(1) - y[b]) ** 2).mean() + (h["l2"].exp() * p["0.weight"] ** 2).sum()

    def ft_loss(e, hd, b):
        return ((fm.outer(e, None, X[b]) @ hd["w"] - y[b]) ** 2).mean()

    class Trainer(hg.MetaPretrainer):
        def pt_step(self, batch):
            with fm.tracking():  # real PT steps commit the running statistics
                return super().pt_step(batch)

    return fm, Trainer(pt_loss=pt_loss, ft_loss=ft_loss, pt_params=fm.params,
                                 ft_head={"w": torch.zeros(6)}, hparams={"l2": torch.zeros(())},
                                 P=2, K=1, extra_state={"net": fm} if extra else None)


@pytest.mark.filterwarnings("ignore::hypergrad.HypergradientWarning")  # online PT: residual > 1
def test_extra_state_makes_functional_module_buffers_resume_exactly(tmp_path):
    pt_batch = lambda i: torch.arange(16) + 16 * (i % 3)  # noqa: E731
    ft_batch = lambda j: (torch.arange(16), torch.arange(16) + 16)  # noqa: E731
    fm_full, full = _bn_trainer(True)
    full.run(4, pt_batch, ft_batch, progress=False)
    for extra in (True, False):
        ckpt = tmp_path / f"run{extra}.pt"
        _, first = _bn_trainer(extra)
        first.run(2, pt_batch, ft_batch, checkpoint=ckpt, checkpoint_every=1, progress=False)
        fm, resumed = _bn_trainer(extra)
        resumed.run(4, pt_batch, ft_batch, checkpoint=ckpt, progress=False)
        same = all(torch.equal(fm.buffers[n], b) for n, b in fm_full.buffers.items())
        assert same == extra  # without extra_state the running statistics restart
        if extra:
            for a, b in zip(hg.tree.leaves(full.pt_params), hg.tree.leaves(resumed.pt_params)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"`extra_state\['net'\]`"):
        hg.MetaPretrainer(pt_loss=lambda p, h, b: p["w"].sum(), ft_loss=lambda e, hd, b: 0,
                          pt_params={"w": torch.zeros(2)}, ft_head={"v": torch.zeros(2)},
                          hparams={"h": torch.zeros(2)}, extra_state={"net": object()})
