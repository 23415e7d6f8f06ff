"""One gradient (the unit) and the second-order products, per problem and dtype.

Compare within a group (``--benchmark-group-by=group``): every row of a group runs on the same
problem. ``matvec`` (``hg.make_hvp`` reused) is what a linear solve pays per iteration.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import methods as M
from benchmarks.conftest import get_problem, run, sizes
from benchmarks.problems import SIZES, resolve

PROBLEMS = sizes(quick=SIZES, full=SIZES, tiny=["logreg", "mlp100k", "cnn"])


@pytest.mark.parametrize("dtype", sizes(quick=[torch.float32, torch.float64],
                                        full=[torch.float32, torch.float64],
                                        tiny=[torch.float32]), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("product", list(M.PRODUCTS))
def test_product(benchmark, problem, dtype, product):
    # products need no stationary point: the 1M MLP skips the L-BFGS fit
    P = get_problem(resolve(problem), dtype, fit_steps=0 if problem == "mlp1m" else None)
    benchmark.group = f"products {problem} {str(dtype)[6:]} ({P.n_params} params)"
    out = run(benchmark, M.PRODUCTS[product](P))
    assert out is not None
