"""Bad input fails early with a clear error naming the argument, or warns and flags the result.

The matrix of cases lives in tests/bad_inputs.py (also a probe script: ``python -m
tests.bad_inputs`` counts good / poor / silent responses of any version of the library). Each
case here must be *good*: an error of the expected type whose message matches (it names the
argument in backticks, or where NaN/inf appeared, or the fix), or a matching
HypergradientWarning, or a solver result that reports its failure. So a test fails if an error
is raised from somewhere deeper (a torch shape error, a KeyError) instead of the entry check,
or if nothing is said at all.
"""

from __future__ import annotations

import functools

import pytest
import torch

import hypergrad as hg
from tests.bad_inputs import CASES, A, H, L, P, b3, classify, f, identity_step


def _param(case):
    marks = []
    if case.pending:
        marks.append(pytest.mark.xfail(strict=True, reason=(
            f"needs a fix owned by the {case.pending} helper that is not on main yet; when this "
            "XPASSes, remove `pending=` from the case in tests/bad_inputs.py")))
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_gets_a_good_answer(case):
    verdict, detail = classify(case)
    assert verdict == "good", f"{case.name}: {verdict}: {detail}"


def test_there_are_many_cases():
    assert len(CASES) >= 120
    assert len({c.name for c in CASES}) == len(CASES)


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
