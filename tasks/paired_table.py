"""One renderer for every results table: per-seed values in JSON -> mean +- std and the paired
difference against the strongest baseline (95% t-interval, n), with a plumbing header.

The JSON a task writes (``paired_spec``) holds the raw per-seed values, so the table in
RESULTS.md is re-rendered from it by ``results_table.check_markdown`` under the name
``paired`` (``RENDERERS``):

    {"title": ..., "metric": "test AUROC", "scale": 100, "digits": 1, "higher_is_better": true,
     "plumbing": false, "baselines": ["no_pt", "graph_sup_pt"], "tuning_seeds": "100-109",
     "per_seed": {"no_pt": {"0": 0.723, ...}, ...}, "extra": {"column": {"method": "cell"}}}

>>> spec = paired_spec("AUROC", {"a": {0: 0.70, 1: 0.72}, "b": {0: 0.71, 1: 0.74}}, ["a"],
...                    scale=100)
>>> print(render_paired(spec))
AUROC x 100 over seeds 0-1 (n = 2)
<BLANKLINE>
| method | AUROC x 100, mean +- std | Δ vs a [95% t-CI] (n) |
|---|---|---|
| a | 71.0 +- 1.4 | baseline (strongest) |
| b | 72.5 +- 2.1 | +1.5 [-4.9, +7.9] (n=2) |
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .paired import compare_to_strongest, format_paired, paired_header
from .results_table import markdown_table, plumbing_title

__all__ = ["paired_spec", "render_paired", "RENDERERS", "seed_range"]


def seed_range(seeds: Iterable[int]) -> str:
    """``0-9`` for a run of consecutive seeds, else a comma list."""
    s = sorted(set(seeds))
    if s and s == list(range(s[0], s[-1] + 1)) and len(s) > 1:
        return f"{s[0]}-{s[-1]}"
    return ",".join(str(x) for x in s)


def paired_spec(
    metric: str,
    per_seed: Mapping[str, Mapping[int, float]],
    baselines: Iterable[str],
    *,
    title: str = "",
    scale: float = 1.0,
    digits: int = 1,
    higher_is_better: bool = True,
    plumbing: bool = False,
    tuning_seeds: str | None = None,
    extra: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """The JSON-ready table spec (seeds as strings, as JSON keys are)."""
    return {
        "title": title,
        "metric": metric,
        "scale": scale,
        "digits": digits,
        "higher_is_better": higher_is_better,
        "plumbing": plumbing,
        "baselines": list(baselines),
        "tuning_seeds": tuning_seeds,
        "per_seed": {
            m: {str(k): float(v) for k, v in vals.items()} for m, vals in per_seed.items()
        },
        "extra": {c: dict(v) for c, v in (extra or {}).items()},
    }


def render_paired(spec: Mapping[str, Any]) -> str:
    """Markdown for a ``paired_spec``: title line (``plumbing check: not a result`` first for
    smoke configs), then one row per method."""
    per = {m: {int(k): float(v) for k, v in vals.items()} for m, vals in spec["per_seed"].items()}
    scale, digits = float(spec.get("scale", 1.0)), int(spec.get("digits", 1))
    diffs = compare_to_strongest(per, spec["baselines"], spec.get("higher_is_better", True))
    base = next(iter(diffs.values())).baseline if diffs else spec["baselines"][0]
    seeds = sorted({k for v in per.values() for k in v})
    unit = spec["metric"] + (f" x {scale:g}" if scale != 1 else "")
    head = f"{unit} over seeds {seed_range(seeds)} (n = {len(seeds)})"
    if spec.get("tuning_seeds"):
        head += f"; choices made on seeds {spec['tuning_seeds']}"
    if spec.get("title"):
        head = f"{spec['title']}: {head}"
    extra = spec.get("extra") or {}
    rows = []
    for m, vals in per.items():
        v = scale * np.array([vals[k] for k in sorted(vals)])
        std = f"{v.std(ddof=1):.{digits}f}" if v.size > 1 else "n/a (n=1)"
        cell = "baseline (strongest)" if m == base else format_paired(diffs[m], scale, digits)
        rows.append(
            [m, f"{v.mean():.{digits}f} +- {std}", cell, *(extra[c].get(m, "-") for c in extra)]
        )
    table = markdown_table(["method", f"{unit}, mean +- std", paired_header(base), *extra], rows)
    return plumbing_title(head, bool(spec.get("plumbing"))) + "\n\n" + table


RENDERERS = {"paired": render_paired}
