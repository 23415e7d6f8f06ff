"""The tables of tasks/ecg/RESULTS.md, rendered from the JSON that ``python -m tasks ecg ...
--export tasks/ecg/results/<name>.json`` writes (checked by tests/test_results_numbers.py).

The JSON keeps the raw per-seed values (``tables[labels][N]`` is a ``paired_spec`` per label
set ``all`` / ``timing`` / ``morphology`` and fine-tuning size N); every table here is computed
from them, so a table cannot drift from its numbers.

- ``ecg_auroc``: test macro AUROC x 100 per method at each N, mean +- std over seeds and the
  paired difference against the strongest baseline without meta-learning (95% t-interval, n).
- ``ecg_groups``: the same over the timing labels and over the morphology labels.
- ``ecg_contrasts``: named paired contrasts (e.g. fixed warp - no warp) per label set and N.
- ``ecg_strengths``: Meta SimCLR's learned warp strength per ground-truth group, and timing
  minus the other two groups paired within each pre-training.
- ``ecg_time``: the interleaved meta / plain PT time ratio.

>>> spec = {"metric": "test macro AUROC", "scale": 100, "digits": 1,
...         "baselines": ["no_pt"], "per_seed": {"no_pt": {"0": 0.80, "1": 0.84},
...                                              "meta_simclr": {"0": 0.82, "1": 0.85}}}
>>> print(ecg_groups({"tables": {"timing": {"100": spec}, "morphology": {"100": spec}}})
...       .split(chr(10) * 2)[1])
| method | N=100 timing | N=100 morphology |
|---|---|---|
| no_pt | 82.0 (baseline) | 82.0 (baseline) |
| meta_simclr | 83.5; +1.5 [-4.9, +7.9] | 83.5; +1.5 [-4.9, +7.9] |
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tasks.ecg.report import METHODS
from tasks.paired import PairedDiff, compare_to_strongest, format_paired, paired_difference
from tasks.paired_table import render_paired, seed_range
from tasks.results_table import Renderer, markdown_table, plumbing_title

__all__ = [
    "RENDERERS",
    "CONTRASTS",
    "LABEL_SETS",
    "per_seed",
    "vs_strongest",
    "contrast",
    "strength_stats",
    "ecg_auroc",
    "ecg_groups",
    "ecg_contrasts",
    "ecg_strengths",
    "ecg_time",
]

LABEL_SETS = ("all", "timing", "morphology")
# the paired contrasts RESULTS.md discusses: (method, baseline)
CONTRASTS = (
    ("meta_simclr", "no_pt"),
    ("meta_simclr", "simclr"),
    ("meta_simclr", "simclr_nowarp"),
    ("simclr", "simclr_nowarp"),
    ("simclr_nowarp", "no_pt"),
    ("simclr_oracle", "simclr"),
    ("simclr_oracle", "simclr_nowarp"),
    ("meta_simclr", "simclr_oracle"),
)
GROUPS = ("normal", "timing", "morphology")


def _ordered(methods: Iterable[str]) -> list[str]:
    """The task's method order (the JSON's keys are sorted); unknown names last."""
    ms = list(methods)
    return sorted(ms, key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m))


def per_seed(spec: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """``{method: {seed: value}}`` of a ``paired_spec`` (JSON keys back to ints), in the task's
    method order."""
    per = spec["per_seed"]
    return {m: {int(k): float(v) for k, v in per[m].items()} for m in _ordered(per)}


def vs_strongest(spec: Mapping[str, Any]) -> dict[str, PairedDiff]:
    """Each method against the strongest of the spec's baselines present (by mean)."""
    per = per_seed(spec)
    base = [b for b in spec["baselines"] if b in per]
    return compare_to_strongest(per, base, spec.get("higher_is_better", True))


def contrast(spec: Mapping[str, Any], method: str, baseline: str) -> PairedDiff | None:
    """``method - baseline`` on their shared seeds (None when either is missing)."""
    per = per_seed(spec)
    if method not in per or baseline not in per:
        return None
    return paired_difference(per, method, baseline)


def _sizes(data: Mapping[str, Any], labels: str = "all") -> list[str]:
    return sorted(data["tables"][labels], key=int)


def _plumbing(data: Mapping[str, Any]) -> bool:
    return bool(data.get("plumbing"))


def ecg_auroc(data: Mapping[str, Any]) -> str:
    """One paired table per fine-tuning size N (all five labels)."""
    parts = []
    for n in _sizes(data):
        spec = dict(data["tables"]["all"][n])
        spec["title"] = f"N = {n}"
        spec["per_seed"] = {m: spec["per_seed"][m] for m in _ordered(spec["per_seed"])}
        parts.append(render_paired(spec))
    return "\n\n".join(parts)


def ecg_groups(data: Mapping[str, Any]) -> str:
    """Timing / morphology label sets: mean and paired difference against that set's strongest
    baseline, per method and N."""
    ns = _sizes(data, "timing")
    cols, cells = [], {}
    for n in ns:
        for labels in ("timing", "morphology"):
            spec = data["tables"][labels][n]
            per, diffs = per_seed(spec), vs_strongest(spec)
            cols.append(f"N={n} {labels}")
            scale, digits = float(spec.get("scale", 1)), int(spec.get("digits", 1))
            for m, vals in per.items():
                mean = f"{scale * np.mean(list(vals.values())):.{digits}f}"
                d = diffs.get(m)
                cell = (
                    f"{mean} (baseline)"
                    if d is None
                    else f"{mean}; {format_paired(d, scale, digits).rsplit(' (n=', 1)[0]}"
                )
                cells.setdefault(m, []).append(cell)
    head = (
        "Timing labels (TACHY, LONG_PR, WIDE_QRS) / morphology labels (ST_DEV, T_INV): "
        "macro AUROC x 100, mean over seeds; Δ vs the strongest baseline of that label set "
        "and N [95% t-CI]"
    )
    return (
        plumbing_title(head, _plumbing(data))
        + "\n\n"
        + markdown_table(["method", *cols], [[m, *c] for m, c in cells.items()])
    )


def ecg_contrasts(data: Mapping[str, Any]) -> str:
    """The named paired contrasts of ``CONTRASTS`` (points x 100, 95% t-interval, n)."""
    ns = _sizes(data)
    rows = []
    for a, b in CONTRASTS:
        for labels in (lab for lab in LABEL_SETS if lab in data["tables"]):
            specs = [data["tables"][labels][n] for n in ns]
            ds = [contrast(s, a, b) for s in specs]
            if all(d is None for d in ds):
                continue
            rows.append(
                [
                    f"{a} - {b}",
                    labels,
                    *("-" if d is None else format_paired(d, 100, 1) for d in ds),
                ]
            )
    head = "Paired differences, macro AUROC x 100, mean [95% t-CI] (n seeds)"
    return (
        plumbing_title(head, _plumbing(data))
        + "\n\n"
        + markdown_table(["comparison", "labels", *(f"N={n}" for n in ns)], rows)
    )


def strength_stats(runs: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Per-group mean strengths of several pre-trainings (``{seed: {group: mean}}``): mean and
    std over runs per group, and timing minus the mean of the other two groups per run with its
    95% t-interval (paired within each run)."""
    seeds = sorted(runs, key=int)
    g = {k: np.array([runs[s][k] for s in seeds]) for k in GROUPS}
    d = g["timing"] - (g["normal"] + g["morphology"]) / 2
    diff = paired_difference(
        {
            "timing": dict(enumerate(g["timing"])),
            "rest": dict(enumerate((g["normal"] + g["morphology"]) / 2)),
        },
        "timing",
        "rest",
    )
    return {
        "seeds": [int(s) for s in seeds],
        "mean": {k: float(v.mean()) for k, v in g.items()},
        "std": {k: float(v.std(ddof=1)) if v.size > 1 else None for k, v in g.items()},
        "timing_minus_rest": {
            "mean": float(d.mean()),
            "lo": diff.lo,
            "hi": diff.hi,
            "n": int(d.size),
        },
    }


def ecg_strengths(data: Mapping[str, Any]) -> str:
    """Learned warp strength by ground-truth group (test records), per N over the Meta SimCLR
    pre-trainings, and the within-run contrast timing - rest."""
    st = data["strengths"]
    ns = sorted(st["runs"], key=int)
    stats = {n: strength_stats(st["runs"][n]) for n in ns}
    rows = []
    for k in GROUPS:
        rows.append(
            [
                k,
                *(
                    f"{s['mean'][k]:.2f} +- {s['std'][k]:.2f}"
                    if s["std"][k] is not None
                    else f"{s['mean'][k]:.2f}"
                    for s in stats.values()
                ),
            ]
        )
    for label, key in (("timing - mean(normal, morphology)", "timing_minus_rest"),):
        cells = []
        for s in stats.values():
            t = s[key]
            ci = "no interval: n=1" if t["lo"] is None else f"{t['lo']:+.3f}, {t['hi']:+.3f}"
            cells.append(f"{t['mean']:+.3f} [{ci}] (n={t['n']})")
        rows.append([label, *cells])
    spread = st.get("within_run_std")
    if spread:
        rows.append(
            [
                "per-example std within a run (min - max over runs)",
                *(
                    f"{min(spread[n].values()):.3f} - {max(spread[n].values()):.3f}"
                    if spread.get(n)
                    else "-"
                    for n in ns
                ),
            ]
        )
    seeds = sorted({int(s) for n in ns for s in st["runs"][n]})
    head = (
        f"Learned warp strength w(x; phi) on the test records (initial {st['init']:g}, "
        f"possible range 0 to {st['max']:g} samples^2), mean +- std over the Meta SimCLR "
        f"pre-trainings of seeds {seed_range(seeds)}"
    )
    return (
        plumbing_title(head, _plumbing(data))
        + "\n\n"
        + markdown_table(["group", *(f"N={n}" for n in ns)], rows)
    )


def ecg_time(data: Mapping[str, Any]) -> str:
    """Meta SimCLR's loop with meta steps vs without (same data, phi, P, K), interleaved."""
    t = data.get("time_ratio")
    if not t:
        return "No time ratio in this JSON (the command ran without `--time-ratio`)."
    pt_step = min(t["plain_seconds"]) / (t["outer"] * t["P"])
    meta_step = (min(t["meta_seconds"]) - min(t["plain_seconds"])) / t["outer"]
    table = markdown_table(
        ["outer iterations x repeats", "plain PT step", "meta step", "Meta SimCLR / plain PT"],
        [
            [
                f"{t['outer']} x {t['repeats']} (P = {t['P']}, K = {t['K']}, "
                f"{t['neumann_terms']} Neumann term)",
                f"{1e3 * pt_step:.0f} ms",
                f"{1e3 * meta_step:.0f} ms = {meta_step / pt_step:.1f} PT steps",
                f"{t['ratio']:.2f}x wall (median {t['ratio_median']:.2f}x), "
                f"{t['cpu_ratio']:.2f}x CPU",
            ]
        ],
    )
    return (
        plumbing_title("Meta SimCLR vs plain PT, wall and CPU time", _plumbing(data))
        + "\n\n"
        + table
    )


RENDERERS: dict[str, Renderer] = {
    "ecg_auroc": ecg_auroc,
    "ecg_groups": ecg_groups,
    "ecg_contrasts": ecg_contrasts,
    "ecg_strengths": ecg_strengths,
    "ecg_time": ecg_time,
}
