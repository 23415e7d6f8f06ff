"""Aggregation over seeds and the results table, the same for every task.

A task hands :func:`compare` its per-seed numbers keyed by method and seed; every row gets the
mean, the standard deviation and the seed count, and, against a named ``baseline`` or the
strongest of ``baselines``, a ``paired`` entry computed by the ``paired`` function from the
seeds both methods share (by default :func:`paired_difference`: the mean of the per-seed
differences with its 95% t-interval ``[lo, hi]`` from :mod:`tasks.paired`, and n).
:func:`fmt_paired` is the table cell; the table itself is ``results_table.markdown_table``.

>>> rows = compare({"a": {0: 1.0, 1: 3.0}, "b": {0: 0.5, 1: 2.0}}, baselines=["b"])
>>> rows["a"]["mean"], rows["a"]["n"], rows["a"]["paired"]["mean"], rows["b"]["baseline"]
(2.0, 2, 0.75, True)
>>> fmt_paired(rows["a"]["paired"])
'+0.8 [-2.4, +3.9] (n=2)'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import paired as _paired
from .results_table import markdown_table

__all__ = ["summarize", "paired_difference", "compare", "PAIRED", "per_seed", "markdown_table",
           "fmt", "fmt_paired"]

PerSeed = dict[int, float]


def summarize(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value), count and the values themselves."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()) if len(a) else float("nan"),
            "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a),
            "values": [float(v) for v in a]}


def paired_difference(method: PerSeed, baseline: PerSeed, level: float = 0.95,
                      interval: str = "t") -> dict[str, Any]:
    """``method - baseline`` on the seeds both have: mean, std, n, per-seed differences and the
    ``level`` interval ``lo``, ``hi`` of :func:`tasks.paired.paired_difference` (``None`` for
    n < 2)."""
    seeds = sorted(set(method) & set(baseline))
    out = summarize([method[s] - baseline[s] for s in seeds])
    out.update(seeds=seeds, lo=None, hi=None, level=level, interval=interval)
    if seeds:
        d = _paired.paired_difference({"m": {s: method[s] for s in seeds},
                                       "b": {s: baseline[s] for s in seeds}}, "m", "b", level,
                                      interval)
        out.update(lo=d.lo, hi=d.hi)
    return out


PAIRED: Callable[[PerSeed, PerSeed], dict[str, Any]] = paired_difference


def per_seed(records: Iterable[dict[str, Any]], value: Callable[[dict[str, Any]], float], *,
             method: str = "method", seed: str = "seed",
             where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, PerSeed]:
    """``{method: {seed: value}}`` from run records (the JSON files the tasks write), the mean
    of ``value(record)`` where several records share a method and seed (FT seeds, folds);
    ``where`` filters records (e.g. one |D_FT|). The input :func:`compare` takes."""
    acc: dict[str, dict[int, list[float]]] = {}
    for r in records:
        if where is None or where(r):
            acc.setdefault(r[method], {}).setdefault(int(r[seed]), []).append(float(value(r)))
    return {m: {s: float(np.mean(v)) for s, v in sorted(d.items())} for m, d in acc.items()}


def compare(per_seed: dict[str, PerSeed], baseline: str | None = None,
            paired: Callable[[PerSeed, PerSeed], dict[str, Any]] | None = None, *,
            baselines: Iterable[str] = (), higher_is_better: bool = True
            ) -> dict[str, dict[str, Any]]:
    """One row per method (``summarize`` of its seeds' values), plus ``row["paired"]`` =
    ``paired(per_seed[method], per_seed[baseline])`` for every other method when ``baseline``
    is given and present; with ``baselines`` (those present) the baseline is the strongest of
    them by mean (:func:`tasks.paired.strongest`). The baseline's row has ``baseline=True``."""
    paired = paired or PAIRED
    present = [b for b in baselines if per_seed.get(b)]
    if baseline is None and present:
        baseline = _paired.strongest(per_seed, present, higher_is_better)
    rows = {}
    for m, vals in per_seed.items():
        row = summarize([vals[s] for s in sorted(vals)])
        row["seeds"] = sorted(vals)
        row["baseline"] = m == baseline
        if baseline is not None and baseline in per_seed and m != baseline:
            row["paired"] = paired(vals, per_seed[baseline])
        rows[m] = row
    return rows


def fmt(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    """``mean +- std`` of a :func:`summarize` dict (``-`` when missing)."""
    if not stat or not stat.get("n"):
        return "-"
    return f"{scale * stat['mean']:.{digits}f} +- {scale * stat['std']:.{digits}f}"


def fmt_paired(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    """The cell ``+0.7 [-0.3, +1.7] (n=3)`` of a :func:`paired_difference` dict (``-`` when
    missing or without shared seeds)."""
    if not stat or not stat.get("n"):
        return "-"
    return _paired.format_paired(_paired.PairedDiff(
        "", "", stat["mean"], stat["lo"], stat["hi"], stat["n"], stat.get("level", 0.95),
        stat.get("interval", "t"), tuple(stat["seeds"]), ()), scale, digits)
