"""Bad input fails early with a ValueError/TypeError whose message names the argument.

Each case is (callable, exception type, regex that must appear in the message). The regexes
name the argument in backticks, as every hypergrad message does, so a test fails if an error
is raised from somewhere deeper (a torch shape error, a KeyError) instead of the entry check.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torchopt

import hypergrad as hg
from hypergrad import testing

P = {"w": torch.zeros(3, dtype=torch.float64)}
H = {"h": torch.ones(2, dtype=torch.float64)}
NAN = float("nan")
INF = float("inf")


def f(p, h):
    return (h["h"].sum() * (p["w"] - 1.0) ** 2).sum()


def L(p, h):
    return p["w"].sum() + h["h"].sum()


def A(v):
    return 2.0 * v


def b3():
    return torch.ones(3, dtype=torch.float64)


def with_value(tree_, value):
    return hg.tree.map(lambda x: torch.full_like(x, value), tree_)


def hreq():
    return hg.tree.detach(H, requires_grad=True)


def backward_through_solution(inner=f, outer=lambda p: p["w"].sum(), **kw):
    h = hreq()
    out = hg.implicit_solution(inner, P, h, **kw)
    outer(out).backward()


def unroll_with(step, **kw):
    return hg.unroll(step, P, hreq(), 3, **kw)


def identity_step(p, h, t):
    return p


CASES = [
    # ---- products: structure, dtype, scalar loss, non-finite, non-tensor --------------------
    ("hvp-v-structure", lambda: hg.hvp(f, P, {"x": torch.ones(3)}, H), ValueError, "`v`"),
    ("hvp-v-shape", lambda: hg.hvp(f, P, {"w": torch.ones(4)}, H), ValueError, "`v`"),
    (
        "hvp-v-dtype",
        lambda: hg.hvp(f, P, {"w": torch.ones(3).float()}, H),
        TypeError,
        "`v`.*float32",
    ),
    ("hvp-fn-nonscalar", lambda: hg.hvp(lambda p: p["w"] ** 2, P, P), ValueError, "`fn`.*scalar"),
    ("hvp-fn-returns-float", lambda: hg.hvp(lambda p: 1.0, P, P), TypeError, "`fn`"),
    (
        "hvp-fn-int-loss",
        lambda: hg.hvp(lambda p: torch.tensor(1), P, P),
        TypeError,
        "`fn`.*floating",
    ),
    ("hvp-fn-not-callable", lambda: hg.hvp("f", P, P), TypeError, "`fn`"),
    ("hvp-params-nan", lambda: hg.hvp(f, with_value(P, NAN), P, H), ValueError, "`params`.*NaN"),
    (
        "hvp-params-int",
        lambda: hg.hvp(f, {"w": torch.zeros(3, dtype=torch.int64)}, P, H),
        TypeError,
        "`params`.*floating",
    ),
    ("hvp-params-empty", lambda: hg.hvp(f, {}, {}, H), ValueError, "`params`.*non-empty"),
    (
        "hvp-params-non-tensor",
        lambda: hg.hvp(f, {"w": [0.0, 1.0]}, P, H),
        TypeError,
        "`params`.*only tensors",
    ),
    (
        "make_hvp-v-dtype",
        lambda: hg.make_hvp(f, P, H)({"w": torch.ones(3).half()}),
        TypeError,
        "`v`",
    ),
    (
        "mixed-hparams-inf",
        lambda: hg.mixed_vjp(f, P, with_value(H, INF), P),
        ValueError,
        "`hparams`.*NaN/inf",
    ),
    ("mixed-v-structure", lambda: hg.mixed_vjp(f, P, H, [torch.ones(3)]), ValueError, "`v`"),
    (
        "mixed-v-dtype",
        lambda: hg.mixed_vjp(f, P, H, {"w": torch.ones(3).float()}),
        TypeError,
        "`v`",
    ),
    # ---- cg ----
    ("cg-b-nan", lambda: hg.cg(A, torch.tensor([1.0, NAN])), ValueError, "`b`.*NaN"),
    ("cg-b-int", lambda: hg.cg(A, torch.tensor([1, 2])), TypeError, "`b`"),
    ("cg-damping-negative", lambda: hg.cg(A, b3(), damping=-0.1), ValueError, "`damping`.*>= 0"),
    ("cg-damping-nan", lambda: hg.cg(A, b3(), damping=NAN), ValueError, "`damping`"),
    ("cg-maxiter-negative", lambda: hg.cg(A, b3(), maxiter=-1), ValueError, "`maxiter`.*>= 0"),
    ("cg-maxiter-float", lambda: hg.cg(A, b3(), maxiter=2.5), ValueError, "`maxiter`.*int"),
    ("cg-tol-negative", lambda: hg.cg(A, b3(), tol=-1e-6), ValueError, "`tol`"),
    ("cg-x0-structure", lambda: hg.cg(A, b3(), x0=[b3()]), ValueError, "`x0`"),
    ("cg-x0-shape", lambda: hg.cg(A, b3(), x0=torch.ones(4)), ValueError, "`x0`"),
    ("cg-x0-dtype", lambda: hg.cg(A, b3(), x0=b3().float()), TypeError, "`x0`"),
    ("cg-x0-inf", lambda: hg.cg(A, b3(), x0=torch.full((3,), INF)), ValueError, "`x0`"),
    ("cg-matvec-not-callable", lambda: hg.cg(None, b3()), TypeError, "`matvec`"),
    ("cg-matvec-structure", lambda: hg.cg(lambda v: {"v": v}, b3()), ValueError, "`matvec`"),
    (
        "cg-matvec-shape-damped",
        lambda: hg.cg(lambda v: v[:2], b3(), damping=0.1),
        ValueError,
        "`matvec`",
    ),
    # ---- neumann / power iteration ----
    (
        "neumann-iterations-negative",
        lambda: hg.neumann(A, b3(), iterations=-2, alpha=0.1),
        ValueError,
        "`iterations`",
    ),
    ("neumann-alpha-zero", lambda: hg.neumann(A, b3(), alpha=0.0), ValueError, "`alpha`.*> 0"),
    ("neumann-alpha-negative", lambda: hg.neumann(A, b3(), alpha=-0.5), ValueError, "`alpha`.*> 0"),
    ("neumann-alpha-nan", lambda: hg.neumann(A, b3(), alpha=NAN), ValueError, "`alpha`"),
    ("neumann-alpha-inf", lambda: hg.neumann(A, b3(), alpha=INF), ValueError, "`alpha`"),
    (
        "neumann-alpha-bad-string",
        lambda: hg.neumann(A, b3(), alpha="bad"),
        ValueError,
        "`alpha`.*'auto'",
    ),
    ("neumann-alpha-bool", lambda: hg.neumann(A, b3(), alpha=True), ValueError, "`alpha`"),
    (
        "neumann-b-inf",
        lambda: hg.neumann(A, torch.tensor([INF, 1.0]), alpha=0.1),
        ValueError,
        "`b`",
    ),
    ("neumann-tol-negative", lambda: hg.neumann(A, b3(), tol=-1.0), ValueError, "`tol`"),
    (
        "neumann-power-iterations-zero",
        lambda: hg.neumann(A, b3(), power_iterations=0),
        ValueError,
        "`power_iterations`",
    ),
    (
        "neumann-matvec-structure",
        lambda: hg.neumann(lambda v: (v,), b3(), alpha=0.1),
        ValueError,
        "`matvec`",
    ),
    (
        "power-iteration-zero-iterations",
        lambda: hg.power_iteration(A, b3(), iterations=0),
        ValueError,
        "`iterations`",
    ),
    (
        "power-iteration-zero-start",
        lambda: hg.power_iteration(A, torch.zeros(3)),
        ValueError,
        "`v0`",
    ),
    # ---- implicit_grad ----
    ("ig-inner-not-callable", lambda: hg.implicit_grad(1, L, P, H), TypeError, "`inner_loss`"),
    ("ig-outer-not-callable", lambda: hg.implicit_grad(f, None, P, H), TypeError, "`outer_loss`"),
    (
        "ig-solver-not-callable",
        lambda: hg.implicit_grad(f, L, P, H, solver="cg"),
        TypeError,
        "`solver`",
    ),
    (
        "ig-solver-wrong-return",
        lambda: hg.implicit_grad(f, L, P, H, solver=lambda m, b: (b, 0)),
        TypeError,
        "`solver`.*SolveResult",
    ),
    (
        "ig-inner-nonscalar",
        lambda: hg.implicit_grad(lambda p, h: p["w"] * h["h"].sum(), L, P, H),
        ValueError,
        "`inner_loss`.*scalar",
    ),
    (
        "ig-outer-nonscalar",
        lambda: hg.implicit_grad(f, lambda p, h: p["w"], P, H),
        ValueError,
        "`outer_loss`.*scalar",
    ),
    (
        "ig-params-nan",
        lambda: hg.implicit_grad(f, L, with_value(P, NAN), H),
        ValueError,
        "`params`.*NaN",
    ),
    (
        "ig-hparams-inf",
        lambda: hg.implicit_grad(f, L, P, with_value(H, -INF)),
        ValueError,
        "`hparams`.*NaN/inf",
    ),
    (
        "ig-dtype-mix",
        lambda: hg.implicit_grad(f, L, P, hg.tree.map(torch.Tensor.float, H)),
        TypeError,
        "`hparams`.*float32.*`params`.*float64",
    ),
    (
        "ig-hparams-int",
        lambda: hg.implicit_grad(f, L, P, {"h": torch.ones(2, dtype=torch.int64)}),
        TypeError,
        "`hparams`",
    ),
    ("ig-hparams-empty", lambda: hg.implicit_grad(f, L, P, {}), ValueError, "`hparams`"),
    (
        "ig-on-failure",
        lambda: hg.implicit_grad(f, L, P, H, on_failure="sometimes"),
        ValueError,
        "`on_failure`.*'warn'",
    ),
    (
        "ig-stationarity-tol",
        lambda: hg.implicit_grad(f, L, P, H, stationarity_tol=-1.0),
        ValueError,
        "`stationarity_tol`",
    ),
    (
        "ig-outer-gradient-inf",
        lambda: hg.implicit_grad(f, lambda p, h: p["w"].sqrt().sum(), P, H),
        ValueError,
        "gradient of `outer_loss`",
    ),
    # ---- implicit_solution ----
    (
        "is-hparams-no-grad",
        lambda: hg.implicit_solution(f, P, H),
        ValueError,
        "`hparams`.*require grad",
    ),
    (
        "is-dtype-mix",
        lambda: hg.implicit_solution(
            f, P, hg.tree.detach(hg.tree.map(torch.Tensor.float, H), True)
        ),
        TypeError,
        "`hparams`.*float32",
    ),
    (
        "is-params-inf",
        lambda: hg.implicit_solution(f, with_value(P, INF), hreq()),
        ValueError,
        "`params`",
    ),
    (
        "is-hparams-nan",
        lambda: hg.implicit_solution(f, P, hg.tree.detach(with_value(H, NAN), True)),
        ValueError,
        "`hparams`",
    ),
    (
        "is-on-failure",
        lambda: hg.implicit_solution(f, P, hreq(), on_failure="loud"),
        ValueError,
        "`on_failure`",
    ),
    ("is-info-not-dict", lambda: hg.implicit_solution(f, P, hreq(), info=[]), TypeError, "`info`"),
    (
        "is-inner-not-callable",
        lambda: hg.implicit_solution(None, P, hreq()),
        TypeError,
        "`inner_loss`",
    ),
    (
        "is-solver-not-callable",
        lambda: hg.implicit_solution(f, P, hreq(), solver=3),
        TypeError,
        "`solver`",
    ),
    (
        "is-solver-wrong-return",
        lambda: backward_through_solution(solver=lambda m, b: b),
        TypeError,
        "`solver`.*SolveResult",
    ),
    (
        "is-inner-nonscalar",
        lambda: backward_through_solution(inner=lambda p, h: p["w"] * h["h"].sum()),
        ValueError,
        "`inner_loss`",
    ),
    (
        "is-incoming-gradient-inf",
        lambda: backward_through_solution(outer=lambda p: p["w"].sqrt().sum()),  # d sqrt(0) = inf
        ValueError,
        "gradient arriving at implicit_solution",
    ),
    # ---- unroll / steps ----
    (
        "unroll-steps-lt-truncate",
        lambda: hg.unroll(identity_step, P, H, 3, truncate=5),
        ValueError,
        "`truncate`.*`steps`",
    ),
    ("unroll-steps-negative", lambda: hg.unroll(identity_step, P, H, -1), ValueError, "`steps`"),
    ("unroll-steps-float", lambda: hg.unroll(identity_step, P, H, 3.0), ValueError, "`steps`"),
    (
        "unroll-truncate-negative",
        lambda: hg.unroll(identity_step, P, H, 3, truncate=-1),
        ValueError,
        "`truncate`",
    ),
    (
        "unroll-checkpoint-zero",
        lambda: hg.unroll(identity_step, P, H, 3, checkpoint_every=0),
        ValueError,
        "`checkpoint_every`",
    ),
    ("unroll-step-not-callable", lambda: hg.unroll(None, P, H, 3), TypeError, "`step`"),
    (
        "unroll-step-structure",
        lambda: unroll_with(lambda p, h, t: [p["w"]]),
        ValueError,
        "`step`.*structure",
    ),
    (
        "unroll-step-structure-truncated",
        lambda: unroll_with(lambda p, h, t: (p,), truncate=1),
        ValueError,
        "`step`",
    ),
    (
        "unroll-step-structure-checkpointed",
        lambda: unroll_with(lambda p, h, t: {"v": p["w"]}, checkpoint_every=2),
        ValueError,
        "`step`",
    ),
    ("gradient-step-lr-zero", lambda: hg.gradient_step(f, lr=0.0), ValueError, "`lr`"),
    ("gradient-step-lr-nan", lambda: hg.gradient_step(f, lr=NAN), ValueError, "`lr`"),
    (
        "gradient-step-loss-not-callable",
        lambda: hg.gradient_step("f", lr=0.1),
        TypeError,
        "`inner_loss`",
    ),
    (
        "gradient-step-loss-nonscalar",
        lambda: unroll_with(hg.gradient_step(lambda p, h: p["w"] * 2, lr=0.1)),
        ValueError,
        "`inner_loss`.*scalar",
    ),
    (
        "optimizer-step-not-optimizer",
        lambda: hg.optimizer_step(f, torch.optim.SGD),
        TypeError,
        "`optimizer`",
    ),
    (
        "optimizer-step-loss-not-callable",
        lambda: hg.optimizer_step(None, torchopt.sgd(lr=0.1)),
        TypeError,
        "`inner_loss`",
    ),
    # ---- tree / testing ----
    ("tree-add-structure", lambda: hg.tree.add(P, H), ValueError, "`a` and `b`"),
    (
        "tree-vdot-shape",
        lambda: hg.tree.vdot(P, {"w": torch.ones(2, 3)}),
        ValueError,
        "`a` and `b`",
    ),
    ("compare-structure", lambda: testing.compare(P, H), ValueError, "`reference` and `approx`"),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_raises_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_there_are_many_cases():
    assert len(CASES) >= 20
    assert len({c[0] for c in CASES}) == len(CASES)


def test_error_messages_say_what_was_received():
    with pytest.raises(TypeError) as e:
        hg.implicit_grad(f, L, P, hg.tree.map(torch.Tensor.float, H))
    assert "float32" in str(e.value) and "float64" in str(e.value)
    with pytest.raises(ValueError) as e:
        hg.hvp(f, P, {"w": torch.ones(4)}, H)
    assert "[4]" in str(e.value) or "(4,)" in str(e.value)
    with pytest.raises(ValueError) as e:
        hg.hvp(lambda p: p["w"] ** 2, P, P)
    assert "(3,)" in str(e.value)
    with pytest.raises(ValueError) as e:
        hg.unroll(identity_step, P, H, 3, truncate=5)
    assert "5" in str(e.value) and "3" in str(e.value)


def test_validation_happens_before_any_work():
    calls = []

    def counting(p, h):
        calls.append(1)
        return f(p, h)

    with pytest.raises(ValueError, match="`on_failure`"):
        hg.implicit_grad(counting, L, P, H, on_failure="never")
    with pytest.raises(ValueError, match="`steps`"):
        hg.unroll(hg.gradient_step(counting, lr=0.1), P, H, -3)
    with pytest.raises(ValueError, match="`damping`"):
        hg.cg(lambda v: calls.append(1) or v, b3(), damping=-1.0)
    assert calls == []


def test_solver_failures_are_not_input_errors():
    # non-convergence is reported, never raised, by the solvers themselves
    res = hg.cg(lambda v: -v, b3(), maxiter=5)
    assert not bool(res.converged)
    res = hg.neumann(A, b3(), iterations=50, alpha=10.0)
    assert not bool(res.converged)
    solver = functools.partial(hg.cg, maxiter=0)
    optimum = {"w": torch.ones(3)}
    with pytest.warns(hg.HypergradientWarning, match="did not converge") as record:
        hg.implicit_grad(f, L, optimum, H, solver=solver)
    assert len(record) == 1
    assert record[0].filename == __file__  # the warning points at the caller's line
