"""Plots of the synthetic experiments (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_rotation", "plot_rotation_modes", "plot_weights"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return Path(path)


def _rotation_axes(ax: Any, results: list[dict[str, Any]], target: float, title: str) -> None:
    """One panel: every run's phi trajectory, the FT angle and its mirror (target - 180); the
    y axis always spans [-180, 180] (every angle mod 360), the x axis every meta step."""
    n = 1
    for r in results:
        ax.plot(r["phi_trajectory"], lw=1, label=f"init {r['init_angle']:.0f}")
        n = max(n, len(r["phi_trajectory"]))
    lo = min([-180.0] + [min(r["phi_trajectory"], default=0.0) for r in results])
    hi = max([180.0] + [max(r["phi_trajectory"], default=0.0) for r in results])
    ax.axhline(target, color="k", ls="--", lw=1.5, label=f"FT angle {target:.0f}")
    ax.axhline(target - 180, color="0.5", ls=":", lw=1.5, label=f"mirror {target - 180:.0f}")
    ax.set_xlim(0, n - 1)
    ax.set_ylim(lo, hi)
    ax.set_yticks([t for t in range(-720, 721, 90) if lo <= t <= hi])
    ax.set_xlabel("meta step")
    ax.set_ylabel("phi (degrees)")
    ax.set_title(title, fontsize=9)


def plot_rotation(results: list[dict[str, Any]], target: float, path: Path,
                  title: str = "Meta-learned PT rotation") -> Path:
    """phi trajectories (one line per run) against the target angle."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    _rotation_axes(ax, results, target, title)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_rotation_modes(results: dict[str, list[dict[str, Any]]], labels: dict[str, str],
                        target: float, path: Path, suptitle: str = "") -> Path:
    """One panel per hypergradient (same seeds, same y range), side by side."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True,
                             squeeze=False)
    for ax, (mode, rs) in zip(axes[0], results.items()):
        _rotation_axes(ax, rs, target, labels.get(mode, mode))
    axes[0][-1].legend(fontsize=6, ncol=2)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return _save(fig, path)


def plot_weights(clean: list[float], noisy: list[float], path: Path, title: str = "",
                 floor: float = 1e-8) -> Path:
    """Histograms of learned per-example weights, clean vs noisy PT labels (log x axis).
    Weights below ``floor`` are counted in the first bin (the x label says how many), so
    every example is in the plot."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    c, n = (np.asarray(v, dtype=float) for v in (clean, noisy))
    allw = np.concatenate([c, n])
    hi = max(allw.max(), floor * 10)
    bins = np.logspace(np.log10(floor), np.log10(hi) + 1e-9, 50)
    below = int((allw < floor).sum())
    ax.hist(np.clip(c, floor, hi), bins=bins, alpha=0.6, label=f"clean (n={c.size})")
    ax.hist(np.clip(n, floor, hi), bins=bins, alpha=0.6, label=f"noisy (n={n.size})")
    ax.set_xscale("log")
    ax.set_xlim(floor, hi * 1.2)
    ax.set_xlabel(f"learned weight ({below} weights below {floor:g} counted in the first bin)")
    ax.set_ylabel("PT examples")
    ax.set_title(title or "Per-example PT weights", fontsize=9)
    ax.legend()
    return _save(fig, path)
