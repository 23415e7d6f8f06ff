"""``hg.implicit_grad`` vs ``torchopt.diff.implicit.custom_root`` at equal iteration counts.

Before anything is timed, both libraries' hypergradients are checked equal (relative error
< 1e-5) on the same problem in float64: CG with ``maxiter=J`` on both sides; the Neumann series
with the same fixed ``alpha`` and the same number of terms (``hg.neumann(iterations=J + 1)`` sums
J + 1 terms, like ``torchopt``'s ``ns`` with ``maxiter=J``). What each side computes is in
``benchmarks/methods.py``. Timings are float32 at equal matvec budgets (see RESULTS.md).
"""

from __future__ import annotations

import functools

import pytest
import torch

import hypergrad as hg
from benchmarks import methods as M
from benchmarks.conftest import get_problem, run, sizes
from benchmarks.problems import resolve

PROBLEMS = sizes(quick=["logreg", "mlp100k", "cnn"], full=["logreg", "mlp100k", "mlp1m", "cnn"],
                 tiny=["logreg", "mlp100k", "cnn"])
JS = sizes(quick=[5, 10, 20], full=[5, 10, 20], tiny=[3])


@functools.cache
def check_equal(problem: str, kind: str, J: int) -> float:
    P = get_problem(resolve(problem), torch.float64)
    ours = M.hg_implicit(P, kind, J + 1 if kind == "neumann" else J)()
    theirs = M.torchopt_implicit(P, kind, J)()
    err = M.rel_error(ours, theirs)
    assert err < 1e-5, f"{problem} {kind} J={J}: hypergrad and torchopt differ by {err:.2e}"
    return err


@pytest.mark.parametrize("lib", ["hypergrad", "torchopt"])
@pytest.mark.parametrize("J", JS)
@pytest.mark.parametrize("kind", ["cg", "neumann"])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_implicit(benchmark, problem, kind, J, lib):
    benchmark.extra_info["rel_err_vs_other_lib_f64"] = check_equal(problem, kind, J)
    P = get_problem(resolve(problem), torch.float32)
    benchmark.group = f"implicit {problem} {kind} J={J}"
    make = M.hg_implicit if lib == "hypergrad" else M.torchopt_implicit
    out = run(benchmark, make(P, kind, J), rounds=3)
    assert set(out) == set(P.hparams)


@pytest.mark.parametrize("lib", ["hypergrad", "torchopt", "torchopt-normal-cg"])
@pytest.mark.parametrize("tol", sizes(quick=[1e-3, 1e-6], full=[1e-3, 1e-6], tiny=[1e-3]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("problem", ["small-logreg", "small-mlp"])
def test_accuracy_at_tolerance(benchmark, problem, dtype, tol, lib):
    """CG to a relative residual ``tol`` (maxiter 2000): error vs the dense-Hessian IFT."""
    P = get_problem(resolve(problem), dtype)
    P64 = get_problem(resolve(problem), torch.float64)
    ref = hg.testing.reference_implicit_grad(P64.inner_loss, P64.outer_loss, P64.params,
                                             P64.hparams)
    if lib == "hypergrad":
        fn = M.hg_implicit(P, "cg", 0, solver=functools.partial(hg.cg, maxiter=2000, tol=tol))
    else:
        import torchopt

        solve = (torchopt.linear_solve.solve_cg if lib == "torchopt"
                 else torchopt.linear_solve.solve_normal_cg)(maxiter=2000, rtol=tol)
        fn = M.torchopt_implicit(P, "cg", 0, solve=solve)
    benchmark.group = f"accuracy {problem} {str(dtype)[6:]} tol={tol:g}"
    out = run(benchmark, fn, rounds=3)
    benchmark.extra_info["rel_err_vs_dense"] = M.rel_error(out, ref)
