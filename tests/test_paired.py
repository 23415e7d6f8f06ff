"""tasks/paired.py against closed forms: t-intervals with tabulated Student-t quantiles (not
scipy), the exact bootstrap distribution by enumeration, and the refusals."""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pytest

from tasks import paired
from tasks.paired import (
    bootstrap_interval,
    compare_to_strongest,
    format_paired,
    paired_difference,
    paired_header,
    strongest,
    t_interval,
)

# two-sided Student-t quantiles t_{q, df} from a printed table (3 decimals)
T_TABLE = {
    (0.975, 1): 12.706,
    (0.975, 2): 4.303,
    (0.975, 4): 2.776,
    (0.975, 9): 2.262,
    (0.95, 4): 2.132,
}


def _metrics(base: list[float], diffs: list[float], seeds: list[int] | None = None):
    seeds = seeds if seeds is not None else list(range(len(base)))
    return {
        "base": dict(zip(seeds, base)),
        "new": {s: b + d for s, b, d in zip(seeds, base, diffs)},
    }


def _half_width(diffs: list[float], q: float) -> float:
    n = len(diffs)
    m = sum(diffs) / n
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))
    return T_TABLE[(q, n - 1)] * sd / math.sqrt(n)


def test_docstring_example() -> None:
    assert doctest.testmod(paired).failed == 0


@pytest.mark.parametrize(
    "diffs,level",
    [
        ([1.0, 2.0, 3.0, 0.0, 4.0], 0.95),
        ([1.0, 2.0, 3.0, 0.0, 4.0], 0.90),
        ([0.5, -0.25, 1.5], 0.95),
        ([0.3, -0.1, 0.8, 0.2, 0.0, 0.5, 1.1, -0.4, 0.6, 0.2], 0.95),
        ([0.01, 0.05], 0.95),
    ],
)
def test_t_interval_matches_the_formula_with_tabulated_quantiles(diffs, level) -> None:
    base = [70.0 + 3 * np.sin(i) for i in range(len(diffs))]  # varied, shared by both methods
    d = paired_difference(_metrics(base, diffs), "new", "base", level=level)
    m = sum(diffs) / len(diffs)
    half = _half_width(diffs, (1 + level) / 2)
    assert d.n == len(diffs) and d.interval == "t" and d.level == level
    assert d.mean == pytest.approx(m, abs=1e-12)
    # centred on the mean; the table has 3 decimals: half-widths agree to 3e-4 relative
    assert (d.lo + d.hi) / 2 == pytest.approx(m, abs=1e-12)
    assert (d.hi - d.lo) / 2 == pytest.approx(half, rel=3e-4)
    assert d.diffs == pytest.approx(diffs, abs=1e-12)


def test_pairing_removes_the_shared_seed_spread() -> None:
    """Seeds that move both methods by +-10 leave the paired interval narrow and positive,
    whereas the unpaired std dwarfs the gap."""
    base = [60.0, 80.0, 65.0, 75.0, 70.0]
    diffs = [1.0, 1.2, 0.8, 1.1, 0.9]
    d = paired_difference(_metrics(base, diffs), "new", "base")
    assert d.excludes_zero and d.lo > 0.7 and d.hi < 1.3
    assert np.std(base, ddof=1) > 5


def test_one_seed_has_no_interval_and_says_so() -> None:
    d = paired_difference(_metrics([70.0], [0.7]), "new", "base")
    assert d.n == 1 and d.lo is None and d.hi is None and not d.defined
    assert not d.excludes_zero
    cell = format_paired(d)
    assert cell == "+0.7 [no interval: n=1] (n=1)"
    assert t_interval([0.7]) is None and bootstrap_interval([0.7]) is None


def test_mismatched_seeds_are_refused_naming_them() -> None:
    m = {"base": {0: 1.0, 1: 2.0, 2: 3.0}, "new": {0: 1.5, 1: 2.5, 3: 3.5}}
    with pytest.raises(ValueError, match=r"'new' lacks seeds \[2\] and 'base' lacks seeds \[3\]"):
        paired_difference(m, "new", "base")


def test_bad_inputs_are_refused() -> None:
    m = _metrics([1.0, 2.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="no per-seed values for method 'other'"):
        paired_difference(m, "other", "base")
    with pytest.raises(ValueError, match="non-finite values at seeds \\[1\\]"):
        paired_difference(
            {"base": {0: 1.0, 1: 2.0}, "new": {0: 1.0, 1: float("nan")}}, "new", "base"
        )
    with pytest.raises(ValueError, match="`interval` must be one of"):
        paired_difference(m, "new", "base", interval="z")
    with pytest.raises(ValueError, match="`level` must be in"):
        paired_difference(m, "new", "base", level=95)
    with pytest.raises(ValueError, match="no seeds"):
        paired_difference({"base": {}, "new": {}}, "new", "base")


def _exact_bootstrap_means(d: list[float]) -> np.ndarray:
    """The mean of every one of the n^n equally likely resamples."""
    return np.array([np.mean(c) for c in itertools.product(d, repeat=len(d))])


def test_bootstrap_n3_is_min_max() -> None:
    """n = 3: each extreme resample has probability 1/27 > 2.5%, so the exact 2.5% / 97.5%
    quantiles of the bootstrap distribution are the smallest and largest difference."""
    d = [0.2, -0.5, 1.4]
    means = _exact_bootstrap_means(d)
    assert (means == min(d)).mean() == pytest.approx(1 / 27)
    lo, hi = bootstrap_interval(d, n_boot=20_000, seed=3)
    assert lo == pytest.approx(min(d), abs=1e-12) and hi == pytest.approx(max(d), abs=1e-12)


def test_bootstrap_matches_the_enumerated_distribution() -> None:
    d = [0.3, -0.1, 0.8, 0.2, 1.1]
    means = np.sort(_exact_bootstrap_means(d))  # 3125 equally likely means
    lo, hi = bootstrap_interval(d, n_boot=100_000, seed=0)
    # Monte Carlo quantiles lie between the exact 2% and 3% (97% and 98%) quantiles
    assert np.quantile(means, 0.02) <= lo <= np.quantile(means, 0.03)
    assert np.quantile(means, 0.97) <= hi <= np.quantile(means, 0.98)


def test_bootstrap_is_reproducible_and_seeded() -> None:
    d = [0.3, -0.1, 0.8, 0.2, 0.0, 0.5, 1.1, -0.4, 0.6, 0.2]
    assert bootstrap_interval(d, seed=1) == bootstrap_interval(d, seed=1)
    assert bootstrap_interval(d, seed=1, n_boot=500) != bootstrap_interval(d, seed=2, n_boot=500)
    r = paired_difference(_metrics([1.0] * 10, d), "new", "base", interval="bootstrap")
    assert r.interval == "bootstrap" and (r.lo, r.hi) == pytest.approx(bootstrap_interval(d))
    with pytest.raises(ValueError, match="`n_boot` must be >= 1"):
        bootstrap_interval(d, n_boot=0)


def test_strongest_baseline_and_comparison() -> None:
    m = {"no_pt": {0: 70.0, 1: 72.0}, "sup": {0: 74.0, 1: 73.0}, "meta": {0: 75.0, 1: 74.5}}
    assert strongest(m, ["no_pt", "sup"]) == "sup"
    assert strongest(m, ["no_pt", "sup"], higher_is_better=False) == "no_pt"
    out = compare_to_strongest(m, ["no_pt", "sup"])
    assert set(out) == {"no_pt", "meta"}
    assert out["meta"].baseline == "sup" and out["meta"].mean == pytest.approx(1.25)
    assert out["no_pt"].mean == pytest.approx(-2.5)
    with pytest.raises(ValueError, match="`baselines` is empty"):
        strongest(m, [])
    with pytest.raises(ValueError, match=r"baselines \['gone'\] have no per-seed values"):
        strongest(m, ["gone"])


def test_format_cell_and_header() -> None:
    d = paired_difference(_metrics([0.7, 0.72, 0.74], [0.01, 0.02, 0.03]), "new", "base")
    assert format_paired(d, scale=100) == "+2.0 [-0.5, +4.5] (n=3)"
    assert format_paired(d, scale=100, digits=2) == "+2.00 [-0.48, +4.48] (n=3)"
    z = paired_difference(_metrics([1.0, 2.0], [-0.01, 0.01]), "new", "base")
    assert format_paired(z).startswith("+0.0 [")  # no "-0.0"
    assert paired_header("graph_sup_pt") == "Δ vs graph_sup_pt [95% t-CI] (n)"
    assert paired_header("x", 0.9, "bootstrap") == "Δ vs x [90% bootstrap CI] (n)"
