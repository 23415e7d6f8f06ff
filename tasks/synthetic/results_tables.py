"""The tables of tasks/synthetic/RESULTS.md, rendered from the JSON in tasks/synthetic/results/
that ``python -m tasks synthetic <experiment> ... --export`` and ``python -m
tasks.synthetic.tune ... --export`` write (export.py, tune.py; checked by
tests/test_results_numbers.py).

- ``synthetic_rotation``: |phi - 90| per hypergradient, mean +- std, the paired difference
  against the one with the lower mean (95% t-interval, n), the starts that ended in the mirror
  basin and the meta-PT / plain-PT time ratio.
- ``synthetic_rotation_starts``: every seed's start, final phi and error per hypergradient.
- ``synthetic_noisy``: clean-vs-noisy weight AUROC and clean / noisy mean-weight ratio of
  Meta-PT against the small-loss heuristic, and the linear-probe accuracy against plain PT.
- ``synthetic_tuning``: every candidate value against the picked one, the rule and the pick.

>>> spec = {"metric": "m", "digits": 1, "baselines": ["a"], "higher_is_better": False,
...         "per_seed": {"a": {"0": 1.0, "1": 3.0}}}
>>> data = {"seeds": [0, 1], "init_angles": [0.0, 18.0], "labels": {"x": "a"},
...         "final_phi": {"a": [91.0, -87.0]}, "table": spec}
>>> print(synthetic_rotation_starts(data))
| seed | start (deg) | a: final phi | a: \\|phi - 90\\| |
|---|---|---|---|
| 0 | 0 | 91.0 | 1.0 |
| 1 | 18 | -87.0 | 3.0 |
"""

from __future__ import annotations

from typing import Any

from tasks.paired_table import render_paired
from tasks.results_table import Renderer, markdown_table

__all__ = [
    "RENDERERS",
    "synthetic_rotation",
    "synthetic_rotation_starts",
    "synthetic_noisy",
    "synthetic_tuning",
]


def synthetic_rotation(data: dict[str, Any]) -> str:
    """The paired table of the rotation run, with the mirror-basin starts and time ratios."""
    spec = dict(data["table"])
    starts = dict(zip(data["seeds"], data["init_angles"]))
    mirror = {
        m: ", ".join(f"{starts[s]:.0f}" for s in seeds) or "none"
        for m, seeds in data["mirror"].items()
    }
    ratio = {
        m: f"{t['ratio']:.2f}x" if t else "not measured" for m, t in data["time_ratio"].items()
    }
    spec["extra"] = {"starts (deg) ending near -90": mirror, "meta / plain PT wall time": ratio}
    return render_paired(spec)


def synthetic_rotation_starts(data: dict[str, Any]) -> str:
    """One row per seed: start angle, then final phi and |phi - 90| per hypergradient."""
    labels = list(data["labels"].values())
    per = data["table"]["per_seed"]
    head = ["seed", "start (deg)"]
    for m in labels:
        head += [f"{m}: final phi", f"{m}: |phi - 90|"]
    rows = []
    for i, (seed, init) in enumerate(zip(data["seeds"], data["init_angles"])):
        row = [str(seed), f"{init:.0f}"]
        for m in labels:
            row += [f"{data['final_phi'][m][i]:.1f}", f"{per[m][str(seed)]:.1f}"]
        rows.append(row)
    return markdown_table(head, rows)


def synthetic_noisy(data: dict[str, Any]) -> str:
    """AUROC and ratio against the small-loss heuristic; probe accuracy against plain PT."""
    order = ("auroc", "ratio", "probe")
    return "\n\n".join(render_paired(data["tables"][k]) for k in order if k in data["tables"])


def synthetic_tuning(data: dict[str, Any]) -> str:
    """Each candidate against the picked value, one table per hypergradient or metric."""
    head = (
        f"Rule (fixed before the runs): {data['rule']}. Picked: **{data['key']}={data['picked']}**."
    )
    return "\n\n".join([head, *(render_paired(s) for s in data["tables"].values())])


RENDERERS: dict[str, Renderer] = {
    "synthetic_rotation": synthetic_rotation,
    "synthetic_rotation_starts": synthetic_rotation_starts,
    "synthetic_noisy": synthetic_noisy,
    "synthetic_tuning": synthetic_tuning,
}
