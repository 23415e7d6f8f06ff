"""The tables of tasks/ppi/RESULTS.md, rendered from the JSON that ``python -m tasks ppi ...
--export results/<name>.json`` writes (checked by tests/test_results_numbers.py).

``ppi_full`` / ``ppi_partial``: test AUROC x 100 (hard half, FT mode chosen on validation) per
method, mean +- std over seeds, the paired difference against the strongest non-meta baseline
(95% t-interval, n) and the weight-relevance AUROC of the methods that weight PT tasks.
``ppi_untuned``: ``ppi_full`` without seed 0, on which the label stand-in and every Meta-PT
setting were chosen before the issue-20 protocol (tasks/ppi/HISTORY.md).
``ppi_pairs``: the paired comparisons the page's conclusions rest on (``PAIRS``), with the
count of seeds the first method wins. ``ppi_per_seed``: every method's value at every seed.
``ppi_time``: the interleaved time ratio.

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

from tasks.paired import format_paired, paired_difference
from tasks.paired_table import render_paired, seed_range
from tasks.results_table import Renderer, markdown_table

__all__ = [
    "RENDERERS",
    "PRE_PROTOCOL_TUNING_SEEDS",
    "ppi_full",
    "ppi_partial",
    "ppi_per_seed",
    "ppi_time",
    "ppi_untuned",
    "ppi_pairs",
    "ppi_pairs_partial",
    "PAIRS",
]

PRE_PROTOCOL_TUNING_SEEDS = ("0",)
"""Seeds (generator and run) on which the label stand-in and Meta-PT's settings were chosen."""


def _weights(data: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, str]:
    cells = {}
    for m, per in (data.get("weight_relevance_auroc") or {}).items():
        v = np.array([x for k, x in per.items() if k not in drop], dtype=float)
        std = f"{v.std(ddof=1):.3f}" if v.size > 1 else "n/a"
        cells[m] = f"{v.mean():.3f} +- {std} (n={v.size})"
    return cells


def _table(data: dict[str, Any], access: str, drop: tuple[str, ...] = ()) -> str:
    spec = dict(data["tables"][access])
    spec["per_seed"] = {
        m: {k: v for k, v in per.items() if k not in drop} for m, per in spec["per_seed"].items()
    }
    if access == "full":
        spec["extra"] = {"weight-relevance AUROC, mean +- std (n)": _weights(data, drop)}
    spec["title"] = f"{data.get('stand_in', 'labels')} stand-in, {access} access"
    return render_paired(spec)


def ppi_full(data: dict[str, Any]) -> str:
    """Full access: every FT task's labels are available to meta-learning."""
    return _table(data, "full")


def ppi_partial(data: dict[str, Any]) -> str:
    """Partial access: a quarter of the FT tasks held out of meta-learning, 4 folds."""
    return _table(data, "partial")


def ppi_untuned(data: dict[str, Any]) -> str:
    """Full access over the seeds never used for a choice (all but PRE_PROTOCOL_TUNING_SEEDS)."""
    return _table(data, "full", PRE_PROTOCOL_TUNING_SEEDS)


PAIRS = (
    ("meta_pt", "graph_sup_pt"),
    ("meta_pt", "no_pt"),
    ("meta_pt", "corr_pt"),
    ("corr_pt", "graph_sup_pt"),
    ("oracle_pt", "graph_sup_pt"),
    ("oracle_pt", "meta_pt"),
    ("graph_sup_pt", "no_pt"),
    ("cotrain_pcgrad", "cotrain"),
    ("ift_cotrain", "cotrain"),
)
"""(method, reference) pairs of ``ppi_pairs``, shown when both ran."""


def _pairs(data: dict[str, Any], access: str) -> str:
    """Method - reference, paired over shared seeds (95% t-interval, n), and the
    number of seeds where the method is ahead."""
    per = {
        m: {int(k): float(v) for k, v in vals.items()}
        for m, vals in data["tables"][access]["per_seed"].items()
    }
    rows = []
    for a, b in PAIRS:
        if a in per and b in per:
            d = paired_difference(per, a, b)
            rows.append(
                [
                    f"{a} - {b}",
                    format_paired(d, 100, 1),
                    f"{sum(x > 0 for x in d.diffs)} of {d.n} (seeds {seed_range(d.seeds)})",
                ]
            )
    return markdown_table(["comparison", "Δ test AUROC x 100 [95% t-CI] (n)", "ahead in"], rows)


def ppi_pairs(data: dict[str, Any]) -> str:
    """Full access: the comparisons of ``PAIRS`` (95% t-interval, n) and seeds ahead."""
    return _pairs(data, "full")


def ppi_pairs_partial(data: dict[str, Any]) -> str:
    """Partial access (mean over the folds' held-out tasks): as ``ppi_pairs``."""
    return _pairs(data, "partial")


def ppi_per_seed(data: dict[str, Any]) -> str:
    """Full access, test AUROC x 100 per method and seed."""
    per = data["tables"]["full"]["per_seed"]
    seeds = sorted({int(k) for v in per.values() for k in v})
    rows = [
        [m, *(f"{100 * v[str(k)]:.1f}" if str(k) in v else "-" for k in seeds)]
        for m, v in per.items()
    ]
    return markdown_table(["method", *(f"seed {k}" for k in seeds)], rows)


def ppi_time(data: dict[str, Any]) -> str:
    """Meta-PT vs plain PT (Graph Sup PT's loop), interleaved repeats of the same run."""
    t = data["time_ratio"]
    pt_step = min(t["plain_seconds"]) / (t["outer"] * t["P"])
    meta_step = (min(t["meta_seconds"]) - min(t["plain_seconds"])) / t["outer"]
    return markdown_table(
        ["outer iterations x repeats", "plain PT step", "meta step", "Meta-PT / plain PT"],
        [
            [
                f"{t['outer']} x {t['repeats']} (P = {t['P']}, K = {t['K']})",
                f"{1e3 * pt_step:.1f} ms",
                f"{1e3 * meta_step:.1f} ms = {meta_step / pt_step:.1f} PT steps",
                f"{t['ratio']:.2f}x wall (median {t['ratio_median']:.2f}x), "
                f"{t['cpu_ratio']:.2f}x CPU",
            ]
        ],
    )


RENDERERS: dict[str, Renderer] = {
    "ppi_full": ppi_full,
    "ppi_partial": ppi_partial,
    "ppi_per_seed": ppi_per_seed,
    "ppi_time": ppi_time,
    "ppi_untuned": ppi_untuned,
    "ppi_pairs": ppi_pairs,
    "ppi_pairs_partial": ppi_pairs_partial,
}
