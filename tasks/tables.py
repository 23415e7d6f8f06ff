"""Aggregation over seeds and the results table, the same for every task.

A task hands :func:`compare` its per-seed numbers keyed by method and seed; every row gets the
mean, the standard deviation and the seed count, and, when a ``baseline`` is named, a
``paired`` entry computed by the ``paired`` function from the seeds both methods share (by
default :func:`paired_difference`: the mean and std of the per-seed differences). A paired
statistic with an interval plugs in as ``paired=`` (or by replacing :data:`PAIRED`) without
touching the tasks.

>>> rows = compare({"a": {0: 1.0, 1: 3.0}, "b": {0: 0.5, 1: 2.0}}, baseline="b")
>>> rows["a"]["mean"], rows["a"]["n"], rows["a"]["paired"]["mean"]
(2.0, 2, 0.75)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = ["summarize", "paired_difference", "compare", "PAIRED", "per_seed", "markdown_table",
           "fmt"]

PerSeed = dict[int, float]


def summarize(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value), count and the values themselves."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()) if len(a) else float("nan"),
            "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a),
            "values": [float(v) for v in a]}


def paired_difference(method: PerSeed, baseline: PerSeed) -> dict[str, Any]:
    """``method - baseline`` on the seeds both have: mean, std, count, per-seed differences."""
    seeds = sorted(set(method) & set(baseline))
    out = summarize([method[s] - baseline[s] for s in seeds])
    out["seeds"] = seeds
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
            paired: Callable[[PerSeed, PerSeed], dict[str, Any]] | None = None
            ) -> dict[str, dict[str, Any]]:
    """One row per method (``summarize`` of its seeds' values), plus ``row["paired"]`` =
    ``paired(per_seed[method], per_seed[baseline])`` for every other method when ``baseline``
    is given and present."""
    paired = paired or PAIRED
    rows = {}
    for m, vals in per_seed.items():
        row = summarize([vals[s] for s in sorted(vals)])
        row["seeds"] = sorted(vals)
        if baseline is not None and baseline in per_seed and m != baseline:
            row["paired"] = paired(vals, per_seed[baseline])
        rows[m] = row
    return rows


def fmt(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    """``mean +- std`` of a :func:`summarize` dict (``-`` when missing)."""
    if not stat or not stat.get("n"):
        return "-"
    return f"{scale * stat['mean']:.{digits}f} +- {scale * stat['std']:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
