"""Shared test configuration: one thread, fixed seeds, float64 by default, fast hypothesis.

Every test runs with ``torch.float64`` as the default dtype (the property tests compare with
closed forms to 1e-8, which float32 cannot resolve) and a fixed torch seed. A test that needs
float32 asks for it explicitly (``dtype=torch.float32``) or uses the ``float32`` fixture.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

# The whole suite must stay fast on a shared 2-core machine: problems are tiny, so examples are
# cheap, but each runs several hundred autograd passes. `HYPOTHESIS_PROFILE=thorough` for more.
settings.register_profile(
    "fast",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

SEED = 0


def pytest_configure(config):
    # torch's forward-mode AD scripts its decompositions on first use (torch.func.hessian):
    # a torch-internal deprecation notice, not something these tests can act on.
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
    )


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """float64 default dtype and a fixed seed for every test; restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(SEED)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def float32():
    """Switch the default dtype to float32 for one test (smoke tests of the float32 path)."""
    torch.set_default_dtype(torch.float32)
    yield torch.float32
    torch.set_default_dtype(torch.float64)
