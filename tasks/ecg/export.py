"""``--export JSON``: the per-seed results of ``python -m tasks ecg`` in the form
tasks/ecg/RESULTS.md renders (``tasks.ecg.results_tables``), with the command line that wrote
them.

The JSON holds, per label set (``all``, ``timing``, ``morphology``) and fine-tuning size N, a
``paired_spec`` of test macro AUROC per method and seed (FT seeds averaged); Meta SimCLR's
learned strengths per ground-truth group and run; the time ratio; the settings; and
``summary``, the statistics RESULTS.md's prose quotes (means, paired differences against the
strongest baseline and the named contrasts), computed by the same functions as the tables.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common import write_json
from tasks.ecg.config import ECGConfig
from tasks.ecg.report import BASELINES, METHODS
from tasks.ecg.results_tables import CONTRASTS, LABEL_SETS, contrast, strength_stats, vs_strongest
from tasks.ecg.synthetic import timing_morphology
from tasks.paired import PairedDiff
from tasks.paired_table import paired_spec
from tasks.tables import per_seed

__all__ = ["export", "build_export"]


def _value(labels: str) -> Callable[[dict[str, Any]], float]:
    if labels == "all":
        return lambda r: r["test_auroc"]
    return lambda r: timing_morphology(r["test_auroc_per_label"])[labels]


def _diff(d: PairedDiff | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {
        "method": d.method,
        "baseline": d.baseline,
        "mean": d.mean,
        "lo": d.lo,
        "hi": d.hi,
        "n": d.n,
        "diffs": list(d.diffs),
    }


def _compute_minutes(results: list[dict[str, Any]]) -> dict[str, float]:
    """Per run seed: fine-tuning plus pre-training wall time in minutes, each pre-training
    counted once (SimCLR's is shared by every N; Meta SimCLR's is one per N)."""
    out: dict[str, float] = {}
    pts: set[tuple[Any, ...]] = set()
    for r in results:
        t = float(r.get("ft_time") or 0.0)
        if r.get("pt_wall_time") is not None:
            key = (
                (r["method"], r["seed"])
                if r["method"] != "meta_simclr"
                else (r["method"], r["seed"], r["n_ft"])
            )
            if key not in pts:
                pts.add(key)
                t += float(r["pt_wall_time"])
        out[str(r["seed"])] = out.get(str(r["seed"]), 0.0) + t / 60
    return out


def build_export(
    results: Iterable[dict[str, Any]],
    *,
    command: str,
    cfg: ECGConfig,
    plumbing: bool,
    settings: dict[str, Any],
    data_seeds: dict[int, int | None],
    ratio: dict[str, Any] | None = None,
    within_run_std: dict[int, dict[int, float]] | None = None,
) -> dict[str, Any]:
    """The export's JSON value from the run records (the files under ``OUT/runs``)."""
    results = list(results)
    synthetic = all("test_auroc_per_label" in r for r in results)
    ns = sorted({int(r["n_ft"]) for r in results})
    label_sets = LABEL_SETS if synthetic and settings.get("data") == "synthetic" else ("all",)
    tables: dict[str, dict[str, Any]] = {}
    for labels in label_sets:
        tables[labels] = {}
        for n in ns:
            per = per_seed(results, _value(labels), where=lambda r, n=n: r["n_ft"] == n)
            per = {m: per[m] for m in METHODS if m in per}  # the task's order, not sorted
            tables[labels][str(n)] = paired_spec(
                "test macro AUROC" + ("" if labels == "all" else f" ({labels} labels)"),
                per,
                [b for b in BASELINES if b in per],
                scale=100,
                digits=1,
                plumbing=plumbing,
            )
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        if (
            r["method"] == "meta_simclr"
            and r.get("ft_seed", 0) == 0
            and (r.get("strengths") or {}).get("by_group")
        ):
            runs.setdefault(str(r["n_ft"]), {})[str(r["seed"])] = r["strengths"]["by_group"]
    summary: dict[str, Any] = {
        "means": {
            lab: {
                n: {m: float(np.mean(list(v.values()))) for m, v in spec["per_seed"].items()}
                for n, spec in t.items()
            }
            for lab, t in tables.items()
        },
        "vs_strongest": {
            lab: {n: {m: _diff(d) for m, d in vs_strongest(spec).items()} for n, spec in t.items()}
            for lab, t in tables.items()
        },
        "contrasts": {
            f"{a}-{b}": {
                lab: {n: _diff(contrast(spec, a, b)) for n, spec in t.items()}
                for lab, t in tables.items()
            }
            for a, b in CONTRASTS
        },
        "strengths": {n: strength_stats(r) for n, r in runs.items()},
        "compute_minutes_per_seed": _compute_minutes(results),
    }
    return {
        "command": command,
        "plumbing": plumbing,
        "data_seeds": {str(k): v for k, v in sorted(data_seeds.items())},
        "tables": tables,
        "strengths": {
            "init": cfg.warp,
            "max": cfg.warp_max,
            "runs": runs,
            "within_run_std": {
                str(n): {str(s): v for s, v in d.items()} for n, d in (within_run_std or {}).items()
            },
        },
        "time_ratio": ratio,
        "summary": summary,
        "costs": [
            {
                k: r.get(k)
                for k in (
                    "method",
                    "n_ft",
                    "seed",
                    "ft_seed",
                    "ft_time",
                    "pt_wall_time",
                    "pt_meta_steps",
                )
            }
            for r in results
        ],
        "settings": settings,
        "config": asdict(cfg),
    }


def export(path: str | Path, results: Iterable[dict[str, Any]], argv: list[str], **kw: Any) -> Path:
    """Write ``build_export(...)`` to ``path`` with the command ``python -m tasks <argv>``."""
    data = build_export(results, command="python -m tasks " + shlex.join(argv), **kw)
    write_json(Path(path), data)
    return Path(path)
