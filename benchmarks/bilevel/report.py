"""Plots (median + quartile bands over seeds), the time-to-threshold table and the targets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .protocol import final, summarise, time_to_threshold

CURVES = (
    ("value", "||grad h||^2"),
    ("test_error", "test error"),
    ("inner_distance", "||theta - theta*||^2"),
)
AXES = (("time", "wall time (s)"), ("grad_equivalents", "gradient-equivalents (full batch)"))
STYLE = {"hypergrad": "-", "torchopt": "--", "higher": ":"}


def plot_problem(name: str, runs: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [c for c in CURVES if any(c[0] in r["records"][0] for r in runs)]
    fig, axes = plt.subplots(len(curves), len(AXES), figsize=(11, 3.2 * len(curves)), squeeze=False)
    for i, (key, label) in enumerate(curves):
        for j, (x, xlabel) in enumerate(AXES):
            ax = axes[i][j]
            for m, c in summarise(runs, x, key).items():
                xs = np.array(c["x"])
                (line,) = ax.plot(xs, c["median"], STYLE.get(c["library"], "-"), label=m)
                ax.fill_between(xs, c["q25"], c["q75"], color=line.get_color(), alpha=0.2)
            ax.set_xscale("log")
            if key != "test_error":
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{name}: median and quartiles over seeds")
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def thresholds_for(problem: str, runs: list[dict]) -> list[float]:
    """1e-2 ... 1e-8 on the quadratic (the target is 1e-8); elsewhere 10^-1 ... 10^-4 times
    the starting ||grad h||^2 (the scales differ by problem)."""
    if problem == "quadratic":
        return [1e-2, 1e-4, 1e-6, 1e-8]
    v0 = float(np.median([r["records"][0]["value"] for r in runs]))
    return [float(f"{v0 * 10.0**-k:.1e}") for k in (1, 2, 3, 4)]


def fmt_time(t: float) -> str:
    return "not reached" if not math.isfinite(t) else f"{t:.3g}"


def table(name: str, runs: list[dict], thresholds: list[float]) -> list[str]:
    ttt = {thr: time_to_threshold(runs, thr) for thr in thresholds}
    metrics = ["value", "test_error", "auroc"]
    fins = {k: final(runs, k) for k in metrics}
    head = "| method | library | " + " | ".join(f"t(\u2264{t:.0e}) s" for t in thresholds)
    head += (
        " | final ||\u2207h||\u00b2 | final test err | final AUROC | ms/step | HVPs/step | failed |"
    )
    lines = [head, "|" + " --- |" * (len(thresholds) + 8)]
    libs = {r["method"]: r["library"] for r in runs}
    per = per_step(runs)
    for m in libs:
        cells = [
            f"{fmt_time(ttt[t][m]['median'])} ({ttt[t][m]['reached']}/{ttt[t][m]['seeds']})"
            for t in thresholds
        ]
        fv = [fins["value"][m], fins["test_error"][m], fins["auroc"][m]]
        fcells = [("" if not math.isfinite(x) else f"{x:.3g}") for x in fv]
        fcells += [f"{per[m]['ms']:.3g}", f"{per[m]['hvps']:.3g}", str(per[m]["failed"])]
        lines.append(f"| {m} | {libs[m]} | " + " | ".join(cells + fcells) + " |")
    return lines


def per_step(runs: list[dict]) -> dict[str, dict]:
    """Per method: median wall ms and HVPs per outer step (last record), failed runs."""
    by: dict[str, list] = {}
    for r in runs:
        last = r["records"][-1]
        steps = max(last["steps"], 1)
        by.setdefault(r["method"], []).append(
            (1e3 * last["time"] / steps, last["hvps"] / steps, bool(r["diverged"]))
        )
    return {
        m: {
            "ms": float(np.median([v[0] for v in vs])),
            "hvps": float(np.median([v[1] for v in vs])),
            "failed": sum(v[2] for v in vs),
        }
        for m, vs in by.items()
    }


def best(runs: list[dict], threshold: float, library: str) -> tuple[str, float]:
    ttt = time_to_threshold(runs, threshold)
    libs = {r["method"]: r["library"] for r in runs}
    cands = [(v["median"], m) for m, v in ttt.items() if libs[m] == library]
    if not cands:
        return "", float("inf")
    t, m = min(cands)
    return (m, t) if math.isfinite(t) else ("none", t)
