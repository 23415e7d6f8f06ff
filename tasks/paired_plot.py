"""Plot a ``paired_spec`` (tasks/paired_table.py): each method's per-seed difference against the
strongest baseline, with its mean and 95% t-interval, on one axis with the zero line.

The spread of the dots is what the interval summarises, so a reader sees at once whether a
method is ahead at every seed or only on average. Smoke configs carry the plumbing label.

    python -m tasks.paired_plot tasks/ppi/results/labels.json --table tables.full \\
        --out tasks/ppi/results/labels.png

>>> import tempfile, pathlib
>>> spec = {"metric": "AUROC", "scale": 100, "baselines": ["a"],
...         "per_seed": {"a": {"0": 0.70, "1": 0.72}, "b": {"0": 0.71, "1": 0.74}}}
>>> path = plot_paired(spec, pathlib.Path(tempfile.mkdtemp()) / "p.png")
>>> path.exists()
True
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tasks.paired import compare_to_strongest  # noqa: E402
from tasks.results_table import plumbing_title  # noqa: E402

__all__ = ["plot_paired", "select"]


def select(data: Mapping[str, Any], table: str) -> Mapping[str, Any]:
    """The spec at a dotted key path of a results JSON (``""``: the JSON itself)."""
    spec: Any = data
    for key in filter(None, table.split(".")):
        if not isinstance(spec, Mapping) or key not in spec:
            raise KeyError(f"--table {table!r}: no key {key!r} (keys: {sorted(spec)})")
        spec = spec[key]
    if "per_seed" not in spec:
        raise KeyError(f"--table {table!r} is not a paired table (no 'per_seed' key)")
    return spec


def plot_paired(spec: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """Dots: per-seed ``scale * (method - strongest baseline)``; bar: mean and 95% t-interval."""
    per = {m: {int(k): float(v) for k, v in vals.items()} for m, vals in spec["per_seed"].items()}
    scale = float(spec.get("scale", 1.0))
    diffs = compare_to_strongest(per, spec["baselines"], spec.get("higher_is_better", True))
    if not diffs:
        raise ValueError("the spec has no method besides its baselines to compare")
    base = next(iter(diffs.values())).baseline
    methods = list(diffs)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(methods) + 2), 3.8))
    rng = np.random.default_rng(0)
    for i, m in enumerate(methods):
        d = diffs[m]
        y = scale * np.asarray(d.diffs)
        ax.scatter(i + rng.uniform(-0.15, 0.15, y.size), y, s=12, alpha=0.6, color="tab:blue")
        lo = scale * d.lo if d.lo is not None else scale * d.mean
        hi = scale * d.hi if d.hi is not None else scale * d.mean
        ax.errorbar(
            i + 0.3,
            scale * d.mean,
            yerr=[[scale * d.mean - lo], [hi - scale * d.mean]],
            fmt="o",
            color="k",
            capsize=4,
        )
    ax.axhline(0.0, color="gray", lw=0.8, ls="--", label=f"{base} (strongest baseline)")
    unit = spec["metric"] + (f" x {scale:g}" if scale != 1 else "")
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel(f"Δ {unit} vs {base}")
    n = len({k for v in per.values() for k in v})
    head = title or spec.get("title") or unit
    ax.set_title(
        plumbing_title(
            f"{head}: per seed (dots), mean and 95% CI (n = {n})", bool(spec.get("plumbing"))
        ),
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tasks.paired_plot", description=__doc__)
    p.add_argument("json", type=Path, help="a results JSON holding a paired_spec")
    p.add_argument("--table", default="", help="dotted key path to the spec, e.g. tables.full")
    p.add_argument("--title", default="", help="plot title (default: the spec's title)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    a = p.parse_args(argv)
    try:
        spec = select(json.loads(a.json.read_text()), a.table)
    except KeyError as e:
        p.error(str(e.args[0]))
    print(plot_paired(spec, a.out, a.title))


if __name__ == "__main__":
    main()
