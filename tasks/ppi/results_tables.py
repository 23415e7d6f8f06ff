"""The tables of tasks/ppi/RESULTS.md, rendered from the JSON that ``python -m tasks ppi ...
--export results/<name>.json`` writes (checked by tests/test_results_numbers.py).

``ppi_full`` / ``ppi_partial``: test AUROC x 100 (hard half, FT mode chosen on validation) per
method, mean +- std over seeds, the paired difference against the strongest non-meta baseline
(95% t-interval, n) and the weight-relevance AUROC of the methods that weight PT tasks.
``ppi_per_seed``: every method's value at every seed. ``ppi_time``: the interleaved time ratio.

>>> spec = {"metric": "test AUROC", "scale": 100, "digits": 1, "baselines": ["no_pt"],
...         "per_seed": {"no_pt": {"0": 0.70, "1": 0.72}, "meta_pt": {"0": 0.73, "1": 0.74}}}
>>> print(ppi_per_seed({"tables": {"full": spec}}))
| method | seed 0 | seed 1 |
|---|---|---|
| no_pt | 70.0 | 72.0 |
| meta_pt | 73.0 | 74.0 |
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.paired_table import render_paired
from tasks.results_table import Renderer, markdown_table

__all__ = ["RENDERERS", "ppi_full", "ppi_partial", "ppi_per_seed", "ppi_time"]


def _weights(data: dict[str, Any]) -> dict[str, str]:
    cells = {}
    for m, per in (data.get("weight_relevance_auroc") or {}).items():
        v = np.array(list(per.values()), dtype=float)
        std = f"{v.std(ddof=1):.3f}" if v.size > 1 else "n/a"
        cells[m] = f"{v.mean():.3f} +- {std} (n={v.size})"
    return cells


def _table(data: dict[str, Any], access: str) -> str:
    spec = dict(data["tables"][access])
    if access == "full":
        spec["extra"] = {"weight-relevance AUROC, mean +- std (n)": _weights(data)}
    spec["title"] = f"{data.get('stand_in', 'labels')} stand-in, {access} access"
    return render_paired(spec)


def ppi_full(data: dict[str, Any]) -> str:
    """Full access: every FT task's labels are available to meta-learning."""
    return _table(data, "full")


def ppi_partial(data: dict[str, Any]) -> str:
    """Partial access: a quarter of the FT tasks held out of meta-learning, 4 folds."""
    return _table(data, "partial")


def ppi_per_seed(data: dict[str, Any]) -> str:
    """Full access, test AUROC x 100 per method and seed."""
    per = data["tables"]["full"]["per_seed"]
    seeds = sorted({int(k) for v in per.values() for k in v})
    rows = [[m, *(f"{100 * v[str(k)]:.1f}" if str(k) in v else "-" for k in seeds)]
            for m, v in per.items()]
    return markdown_table(["method", *(f"seed {k}" for k in seeds)], rows)


def ppi_time(data: dict[str, Any]) -> str:
    """Meta-PT vs plain PT (Graph Sup PT's loop), interleaved repeats of the same run."""
    t = data["time_ratio"]
    pt_step = min(t["plain_seconds"]) / (t["outer"] * t["P"])
    meta_step = (min(t["meta_seconds"]) - min(t["plain_seconds"])) / t["outer"]
    return markdown_table(
        ["outer iterations x repeats", "plain PT step", "meta step", "Meta-PT / plain PT"],
        [[f"{t['outer']} x {t['repeats']} (P = {t['P']}, K = {t['K']})",
          f"{1e3 * pt_step:.1f} ms", f"{1e3 * meta_step:.1f} ms = {meta_step / pt_step:.1f} PT "
          "steps", f"{t['ratio']:.2f}x wall (median {t['ratio_median']:.2f}x), "
          f"{t['cpu_ratio']:.2f}x CPU"]])


RENDERERS: dict[str, Renderer] = {
    "ppi_full": ppi_full,
    "ppi_partial": ppi_partial,
    "ppi_per_seed": ppi_per_seed,
    "ppi_time": ppi_time,
}
