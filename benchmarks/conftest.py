"""pytest-benchmark setup: threads, warning filters, shared problems, size switch.

``HYPERGRAD_BENCH_SIZE=tiny|quick|full`` picks the sizes (tiny: the smoke test, which runs every
benchmark once with ``--benchmark-disable``); ``HYPERGRAD_BENCH_THREADS`` (default 1: ratios
are steadier on a shared machine) sets ``torch.set_num_threads``.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from benchmarks.problems import bench_size, make_problem

torch.set_num_threads(int(os.environ.get("HYPERGRAD_BENCH_THREADS", "1")))
warnings.filterwarnings("ignore", category=FutureWarning)  # torchopt's functorch.vjp notice

_PROBLEMS: dict = {}


def get_problem(name: str, dtype: torch.dtype = torch.float32, **kw):
    """Problems are built (and fitted) once per session."""
    key = (name, dtype, tuple(sorted(kw.items())))
    if key not in _PROBLEMS:
        _PROBLEMS[key] = make_problem(name, dtype, **kw)
    return _PROBLEMS[key]


def run(benchmark, fn, rounds: int = 5):
    """Time ``fn`` (one warm-up round); returns its result."""
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning")  # functorch.vjp notice


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sizes(quick: list, full: list, tiny: list) -> list:
    return {"quick": quick, "full": full, "tiny": tiny}[bench_size()]
