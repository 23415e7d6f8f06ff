"""PNG plots of a results folder: AUROC per method, learned task weights by relevance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tasks.results_table import plumbing_title  # noqa: E402

__all__ = ["plot_all", "plot_auroc", "plot_weights"]


def plot_auroc(out: Path, table: dict[str, Any], plumbing: bool = False) -> Path:
    """Bars: test AUROC (FT mode chosen on validation), mean +- std, full and partial access,
    on the full 0-100 axis with the chance line at 50."""
    methods = list(table)
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 2, 3.6))
    x = np.arange(len(methods))
    for k, (access, color) in enumerate((("full", "tab:blue"), ("partial", "tab:orange"))):
        mean = [table[m].get(access, {}).get("best", {}).get("mean", np.nan) for m in methods]
        std = [table[m].get(access, {}).get("best", {}).get("std", 0.0) for m in methods]
        ax.bar(x + (k - 0.5) * 0.38, 100 * np.array(mean), 0.38, yerr=100 * np.array(std),
               capsize=3, color=color, label=f"{access} access")
    ax.set_xticks(x, methods, rotation=20)
    ax.set_ylabel("test AUROC x 100")
    ax.set_ylim(0, 100)
    ax.axhline(50, color="gray", lw=0.8, ls="--", label="chance")
    ax.set_title(plumbing_title("PPI test AUROC", plumbing))
    ax.legend()
    fig.tight_layout()
    path = out / "auroc.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_weights(out: Path) -> Path | None:
    """Learned PT task weights 2 sigmoid(phi) of the full-access Meta-PT runs, grouped by the
    synthetic task kind (relevant / irrelevant-factor / noise), or a histogram without labels."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("meta_pt__shared__*"))]
    runs = [r for r in runs if r.get("weights")]
    if not runs:
        return None
    def kinds_of(run: dict[str, Any]) -> list[str] | None:  # --vary-data: data/s<seed>/
        for p in (out / "data" / f"s{run['seed']}", out / "data"):
            if (p / "synthetic_meta.json").exists():
                return json.loads((p / "synthetic_meta.json").read_text())["pt_kinds"]
        return None

    kinds = kinds_of(runs[0])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    rng = np.random.default_rng(0)
    if kinds is None:
        ax.hist(np.concatenate([r["weights"] for r in runs]), bins=40)
        ax.set_xlabel("learned weight 2 sigmoid(phi)")
    else:
        groups = ("relevant", "irrelevant", "noise")
        for gi, g in enumerate(groups):
            w = np.concatenate([np.asarray(r["weights"])[np.asarray(kinds_of(r)) == g]
                                for r in runs])
            ax.scatter(gi + rng.uniform(-0.25, 0.25, w.size), w, s=8, alpha=0.6)
            ax.hlines(np.median(w), gi - 0.3, gi + 0.3, color="k")
        ax.set_xticks(range(3), ["relevant", "irrelevant factors", "noise"])
        ax.set_ylabel("learned weight 2 sigmoid(phi)")
        aucs = [r["weight_relevance_auroc"] for r in runs if "weight_relevance_auroc" in r]
        if aucs:
            ax.set_title(f"weight-relevance AUROC {np.mean(aucs):.3f} ({len(aucs)} seeds)")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    fig.tight_layout()
    path = out / "weights.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(out: Path, table: dict[str, Any], plumbing: bool = False) -> list[Path]:
    paths = [plot_auroc(out, table, plumbing)]
    w = plot_weights(out)
    return paths + ([w] if w else [])
