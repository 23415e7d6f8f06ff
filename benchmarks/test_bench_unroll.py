"""Unrolled hypergradients: ``hg.unroll`` (full, truncated, checkpointed) vs higher and torchopt.

T SGD steps (lr 1) from the problem's initialisation, the last K recorded (K = T: full), then
``dL_val(params_T)/dhparams``. All three libraries are checked to agree (float64) first.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from benchmarks import methods as M
from benchmarks.conftest import get_problem, run, sizes
from benchmarks.problems import resolve

PROBLEM = "mlp100k"
BATCH = sizes(quick=128, full=512, tiny=None)
TS = sizes(quick=[10, 50, 200], full=[10, 50, 200], tiny=[4])
KS = sizes(quick=[None, 1, 5, 20], full=[None, 1, 5, 20], tiny=[None, 2])


@functools.cache
def check_agree() -> None:
    P = get_problem(resolve(PROBLEM), torch.float64, batch=BATCH)
    for K in (None, 2):
        ref = M.hg_unroll(P, 4, K)()
        for name in ("higher", "torchopt"):
            err = M.rel_error(M.UNROLLS[name](P, 4, K)(), ref)
            assert err < 1e-10, f"{name} disagrees with hypergrad (K={K}): {err:.2e}"
        err = M.rel_error(M.hg_unroll(P, 4, K, checkpoint_every=2)(), ref)
        assert err < 1e-10, f"checkpointed unroll disagrees (K={K}): {err:.2e}"


@pytest.mark.parametrize("lib", list(M.UNROLLS))
@pytest.mark.parametrize("K", KS, ids=lambda k: "full" if k is None else f"K{k}")
@pytest.mark.parametrize("T", TS)
def test_unroll(benchmark, T, K, lib):
    if K is not None and K >= T:
        pytest.skip("K >= T is the full unroll")
    check_agree()
    P = get_problem(resolve(PROBLEM), torch.float32, batch=BATCH)
    benchmark.group = f"unroll T={T} {'full' if K is None else f'K={K}'}"
    run(benchmark, M.UNROLLS[lib](P, T, K), rounds=3)


@pytest.mark.parametrize("T", TS)
def test_unroll_checkpointed(benchmark, T):
    check_agree()
    P = get_problem(resolve(PROBLEM), torch.float32, batch=BATCH)
    c = math.ceil(math.sqrt(T))
    benchmark.group = f"unroll T={T} full"
    benchmark.extra_info["checkpoint_every"] = c
    run(benchmark, M.hg_unroll(P, T, None, checkpoint_every=c), rounds=3)
