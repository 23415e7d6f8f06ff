"""Paired statistics over seeds: each method against the strongest baseline on the same seeds.

With per-seed values x_s (method) and b_s (baseline) on the same seeds s = 1..n, the paired
differences d_s = x_s - b_s have mean d = (1/n) sum_s d_s and sample std
sd = sqrt(sum_s (d_s - d)^2 / (n - 1)). The 95% t-interval is

    d +- t_{0.975, n-1} sd / sqrt(n),

and the percentile bootstrap interval takes the 2.5% and 97.5% quantiles of the mean of n
differences drawn with replacement (a fixed ``numpy`` generator, so tables are reproducible).
Seeds pair runs that share data and initialisation, so the seed-to-seed spread common to both
methods cancels; an unpaired mean +- std keeps it. With n = 1 no interval exists: it is
reported as undefined (``None``), never as a zero-width interval.

>>> m = {"base": {0: 0.70, 1: 0.72, 2: 0.74}, "new": {0: 0.71, 1: 0.74, 2: 0.77}}
>>> d = paired_difference(m, "new", "base")
>>> round(d.mean, 4), d.n, [round(v, 4) for v in (d.lo, d.hi)]
(0.02, 3, [-0.0048, 0.0448])
>>> format_paired(d, scale=100)
'+2.0 [-0.5, +4.5] (n=3)'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PairedDiff",
    "paired_values",
    "t_interval",
    "bootstrap_interval",
    "paired_difference",
    "strongest",
    "compare_to_strongest",
    "format_paired",
    "paired_header",
]

Metrics = Mapping[str, Mapping[int, float]]
INTERVALS = ("t", "bootstrap")


@dataclass(frozen=True)
class PairedDiff:
    """``method - baseline`` over ``n`` shared seeds: mean, interval ``[lo, hi]`` (``None``
    when undefined, n < 2) at ``level``, the interval kind and the per-seed differences."""

    method: str
    baseline: str
    mean: float
    lo: float | None
    hi: float | None
    n: int
    level: float
    interval: str
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]

    @property
    def defined(self) -> bool:
        """Whether the interval exists (it needs at least two seeds)."""
        return self.lo is not None and self.hi is not None

    @property
    def excludes_zero(self) -> bool:
        """The interval lies strictly on one side of 0 (False when undefined)."""
        return self.defined and (self.lo > 0 or self.hi < 0)  # type: ignore[operator]


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"`level` must be in (0, 1), got {level}")


def paired_values(
    metrics: Metrics, method: str, baseline: str
) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """Seeds and the aligned per-seed values of ``method`` and ``baseline``.

    Refuses (ValueError) unknown methods, seed sets that differ (naming the seeds each lacks:
    pairing needs the same seeds) and non-finite values."""
    for name in (method, baseline):
        if name not in metrics:
            raise ValueError(f"no per-seed values for method {name!r}; have {sorted(metrics)}")
    a, b = metrics[method], metrics[baseline]
    sa, sb = set(a), set(b)
    if sa != sb:
        raise ValueError(
            f"paired comparison needs the same seeds: {method!r} lacks seeds "
            f"{sorted(sb - sa)} and {baseline!r} lacks seeds {sorted(sa - sb)}. Run the "
            "missing seeds (or restrict both to common seeds) before comparing."
        )
    if not sa:
        raise ValueError(f"no seeds for {method!r} and {baseline!r}")
    seeds = tuple(sorted(sa))
    x = np.array([a[s] for s in seeds], dtype=float)
    y = np.array([b[s] for s in seeds], dtype=float)
    for name, v in ((method, x), (baseline, y)):
        bad = [s for s, t in zip(seeds, v) if not math.isfinite(t)]
        if bad:
            raise ValueError(f"{name!r} has non-finite values at seeds {bad}")
    return seeds, x, y


def t_interval(diffs: Iterable[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval mean +- t_{(1+level)/2, n-1} sd / sqrt(n); ``None`` for n < 2."""
    _check_level(level)
    d = np.asarray(list(diffs), dtype=float)
    if d.size < 2:
        return None
    from scipy.stats import t as student_t

    half = float(student_t.ppf((1 + level) / 2, d.size - 1)) * float(d.std(ddof=1))
    half /= math.sqrt(d.size)
    m = float(d.mean())
    return m - half, m + half


def bootstrap_interval(
    diffs: Iterable[float], level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (``n_boot`` resamples from
    ``numpy.random.default_rng(seed)``); ``None`` for n < 2."""
    _check_level(level)
    if n_boot < 1:
        raise ValueError(f"`n_boot` must be >= 1, got {n_boot}")
    d = np.asarray(list(diffs), dtype=float)
    if d.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(
    metrics: Metrics,
    method: str,
    baseline: str,
    level: float = 0.95,
    interval: str = "t",
    n_boot: int = 10_000,
    seed: int = 0,
) -> PairedDiff:
    """``method - baseline`` on their shared seeds with a ``level`` interval (``"t"`` or
    ``"bootstrap"``)."""
    if interval not in INTERVALS:
        raise ValueError(f"`interval` must be one of {INTERVALS}, got {interval!r}")
    _check_level(level)
    seeds, x, y = paired_values(metrics, method, baseline)
    d = x - y
    ci = (
        t_interval(d, level)
        if interval == "t"
        else bootstrap_interval(d, level, n_boot=n_boot, seed=seed)
    )
    lo, hi = (None, None) if ci is None else ci
    return PairedDiff(
        method,
        baseline,
        float(d.mean()),
        lo,
        hi,
        int(d.size),
        level,
        interval,
        seeds,
        tuple(float(v) for v in d),
    )


def strongest(metrics: Metrics, baselines: Iterable[str], higher_is_better: bool = True) -> str:
    """The baseline with the best mean over its seeds (first listed on ties)."""
    names = list(baselines)
    if not names:
        raise ValueError("`baselines` is empty: name at least one baseline method")
    missing = [b for b in names if b not in metrics or not metrics[b]]
    if missing:
        raise ValueError(f"baselines {missing} have no per-seed values; have {sorted(metrics)}")
    sign = 1.0 if higher_is_better else -1.0
    return max(names, key=lambda b: sign * float(np.mean(list(metrics[b].values()))))


def compare_to_strongest(
    metrics: Metrics, baselines: Iterable[str], higher_is_better: bool = True, **kw: object
) -> dict[str, PairedDiff]:
    """Every method other than the strongest baseline, paired against it (keyword arguments go
    to :func:`paired_difference`). Differences are always ``method - baseline``."""
    best = strongest(metrics, baselines, higher_is_better)
    return {
        m: paired_difference(metrics, m, best, **kw)  # type: ignore[arg-type]
        for m in metrics
        if m != best
    }


def _signed(x: float, digits: int) -> str:
    s = f"{x:+.{digits}f}"
    return "+" + s[1:] if float(s) == 0 else s  # no "-0.0"


def format_paired(d: PairedDiff, scale: float = 1.0, digits: int = 1) -> str:
    """Table cell ``+0.7 [-0.3, +1.7] (n=3)``, values times ``scale``; with one seed the
    interval is spelled out as undefined: ``+0.7 [no interval: n=1] (n=1)``."""
    mean = _signed(scale * d.mean, digits)
    if not d.defined:
        return f"{mean} [no interval: n={d.n}] (n={d.n})"
    lo, hi = sorted((scale * d.lo, scale * d.hi))  # type: ignore[operator]
    return f"{mean} [{_signed(lo, digits)}, {_signed(hi, digits)}] (n={d.n})"


def paired_header(baseline: str, level: float = 0.95, interval: str = "t") -> str:
    """Column header matching :func:`format_paired`: ``Δ vs <baseline> [95% t-CI] (n)``."""
    kind = "t-CI" if interval == "t" else "bootstrap CI"
    return f"Δ vs {baseline} [{round(100 * level)}% {kind}] (n)"
