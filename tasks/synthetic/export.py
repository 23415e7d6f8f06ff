"""The JSON behind tasks/synthetic/RESULTS.md, written by ``python -m tasks synthetic
<experiment> ... --export PATH`` (and ``python -m tasks.synthetic.tune ... --export PATH``).

Every file holds the ``command`` that wrote it, the settings, the per-seed values and, for each
table, a ``tasks.paired_table.paired_spec`` (mean +- std and the paired difference against the
strongest baseline with its 95% t-interval and n); ``results_tables.py`` renders them.

- rotation: |phi - 90| per seed for each hypergradient of the run (the forward-mode tangent and
  Algorithm 1's IFT, compared with each other: the reference is the one with the lower mean
  error), the final angles, the starts that ended in the mirror basin, the time ratios.
- noisy: clean-vs-noisy weight AUROC and clean / noisy mean-weight ratio of Meta-PT's weights
  against the small-loss heuristic (weights = inverse plain-PT loss at the end of the warm-up;
  ``baselines.py``), and the linear-probe accuracy of Meta-PT's encoder against plain PT's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.harness import read_json
from tasks.paired import compare_to_strongest
from tasks.paired_table import paired_spec

from .precond import IFT_LABELS

__all__ = ["rotation_export", "noisy_export", "summary", "ROTATION_METRIC"]

ROTATION_METRIC = "|phi - 90| (degrees)"


def summary(spec: dict[str, Any]) -> dict[str, Any]:
    """What the rendered table of ``spec`` shows, as numbers (so the prose can quote them):
    per method mean, std and n (unscaled), and the paired difference against the strongest
    baseline (mean, 95% t-interval lo / hi, n; ``None`` for n < 2)."""
    per = {m: {int(k): float(v) for k, v in vals.items()} for m, vals in spec["per_seed"].items()}
    out: dict[str, Any] = {"methods": {}, "paired": {}}
    for m, vals in per.items():
        v = np.array(list(vals.values()))
        out["methods"][m] = {
            "mean": float(v.mean()),
            "n": int(v.size),
            "std": float(v.std(ddof=1)) if v.size > 1 else None,
        }
    diffs = compare_to_strongest(per, spec["baselines"], spec.get("higher_is_better", True))
    for m, d in diffs.items():
        out["baseline"] = d.baseline
        out["paired"][m] = {"mean": d.mean, "lo": d.lo, "hi": d.hi, "n": d.n}
    return out


def rotation_export(
    metrics: dict[str, Any], *, command: str, config: str, plumbing: bool, elapsed: dict[str, float]
) -> dict[str, Any]:
    """A rotation run's metrics (one or several hypergradients) as the results JSON."""
    modes = metrics.get("modes", [metrics["config"]["ift"]])
    per_mode = metrics.get("per_mode", {modes[0]: metrics})
    seeds = metrics["seeds"]
    labels = {m: IFT_LABELS[m] for m in modes}
    errors = {labels[m]: dict(zip(seeds, per_mode[m]["errors"])) for m in modes}
    table = paired_spec(
        ROTATION_METRIC,
        errors,
        list(errors),
        digits=2,
        higher_is_better=False,
        plumbing=plumbing,
        title=f"rotation, config {config}",
    )
    return {
        "command": command,
        "experiment": "rotation",
        "config_name": config,
        "plumbing": plumbing,
        "seeds": seeds,
        "modes": modes,
        "labels": labels,
        "table": table,
        "summary": summary(table),
        "init_angles": metrics["init_angles"],
        "final_phi": {labels[m]: per_mode[m]["final_phi"] for m in modes},
        "error_median": {labels[m]: per_mode[m]["error_median"] for m in modes},
        "probe_test_accuracy": {labels[m]: per_mode[m]["probe_test_accuracy"] for m in modes},
        "mirror": {labels[m]: metrics.get("mirror", {}).get(m, []) for m in modes},
        "time_ratio": {labels[m]: per_mode[m].get("time_ratio") for m in modes},
        "elapsed": elapsed,
        "paper": {"error_mean": 7.2, "error_std": 1.5},  # Raghu et al. 2021, the target
        "settings": metrics["config"],
    }


def noisy_export(
    metrics: dict[str, Any],
    out: Path,
    *,
    command: str,
    config: str,
    plumbing: bool,
    elapsed: dict[str, float],
) -> dict[str, Any]:
    """A noisy-label run (its per-seed ``result.json`` files under ``out``) as the results
    JSON. Seeds resumed past the warm-up have no small-loss values: the paired tables then
    refuse the seed sets (run them with --fresh)."""
    seeds = metrics["seeds"]
    res = {s: read_json(Path(out) / f"seed{s}" / "result.json") for s in seeds}

    def per(key: str) -> dict[int, float]:
        return {s: r[key] for s, r in res.items() if key in r}

    spec = dict(plumbing=plumbing, title=f"noisy labels, config {config}")
    tables = {
        "auroc": paired_spec(
            "clean-vs-noisy weight AUROC",
            {"meta_pt": per("auroc"), "small_loss": per("small_loss_auroc")},
            ["small_loss"],
            digits=3,
            **spec,
        ),
        "ratio": paired_spec(
            "clean / noisy mean weight",
            {"meta_pt": per("ratio"), "small_loss": per("small_loss_ratio")},
            ["small_loss"],
            digits=1,
            **spec,
        ),
    }
    if all("baseline_probe_test_accuracy" in r for r in res.values()):
        tables["probe"] = paired_spec(
            "linear-probe test accuracy",
            {
                "meta_pt": per("probe_test_accuracy"),
                "plain_pt": per("baseline_probe_test_accuracy"),
            },
            ["plain_pt"],
            digits=3,
            **spec,
        )
    return {
        "command": command,
        "experiment": "noisy",
        "summary": {k: summary(t) for k, t in tables.items()},
        "config_name": config,
        "plumbing": plumbing,
        "seeds": seeds,
        "tables": tables,
        "median_ratio": {str(s): v for s, v in per("median_ratio").items()},
        "noise_frac_realised": {str(s): v for s, v in per("noise_frac_realised").items()},
        "elapsed": elapsed,
        "paper": {"ratio_min": 100},  # Raghu et al. 2021: clean / noisy weight ratio > 100
        "settings": metrics["config"],
    }
