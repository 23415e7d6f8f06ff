"""Figures for the ECG reproduction: AUROC vs |D_FT| and example augmented signals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.ecg.augment import jitter, random_crop, temporal_warp

__all__ = ["plot_auroc", "plot_augmentations", "plot_strengths"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_auroc(summary: dict[str, dict[int, tuple[float, float, int]]], path: str | Path,
               title: str = "") -> Path:
    """``summary[method][n_ft] = (mean, std, count)`` -> errorbar plot of test macro AUROC."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    k = len(summary)
    for i, (method, rows) in enumerate(summary.items()):
        ns = sorted(rows)
        m = np.array([rows[n][0] for n in ns])
        s = np.array([rows[n][1] for n in ns])
        dodge = 1.04 ** (i - (k - 1) / 2)  # side by side, so no error bar hides another
        ax.errorbar(np.array(ns) * dodge, 100 * m, yerr=100 * s, marker="o", ms=4, capsize=3,
                    label=method)
    ax.set_xscale("log")
    all_ns = sorted({n for rows in summary.values() for n in rows})
    ax.set_xticks(all_ns, [str(n) for n in all_ns])
    ax.minorticks_off()
    ax.set_xlim(all_ns[0] / 1.5, all_ns[-1] * 1.5)
    ax.set_xlabel("|D_FT|")
    ax.set_ylabel("test macro AUROC (%)")
    ax.set_ylim(0, 100)
    ax.axhline(50, color="gray", lw=0.8, ls="--", label="chance")
    ax.set_title(title or "AUROC vs |D_FT| (mean +- std over seeds)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_augmentations(x: torch.Tensor, path: str | Path, *, crop: float = 0.5,
                       noise: float = 0.1, warps: tuple[float, ...] = (25.0, 100.0),
                       sigma: float = 15.0, lead: int = 1, seed: int = 0,
                       length: int = 400) -> Path:
    """One signal (``x`` is (leads, time)) before/after each augmentation, in the paper's order."""
    plt = _plt()
    x = x.unsqueeze(0).double()
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    panels = [("original", x), (f"random crop (up to {crop:.0%})", random_crop(x, crop, g())),
              (f"jitter (std up to {noise:g} x lead std)", jitter(x, noise, g()))]
    for w in warps:
        y, pos = temporal_warp(x, w, g(), sigma=sigma, return_positions=True)
        disp = float((pos - torch.arange(x.shape[-1])).abs().max())
        panels.append((f"temporal warp, strength {w:g} (max |u| = {disp:.1f} samples)", y))
    fig, axs = plt.subplots(len(panels), 1, figsize=(9, 1.6 * len(panels)), sharex=True)
    for ax, (name, y) in zip(axs, panels):
        ax.plot(x[0, lead, :length].numpy(), color="0.75", lw=1)
        ax.plot(y[0, lead, :length].numpy(), lw=1)
        ax.set_title(name, fontsize=9)
    axs[-1].set_xlabel("sample (100 Hz)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_strengths(runs: dict[tuple[int, int], dict[str, list[float]]], path: str | Path, *,
                   max_strength: float = 100.0, init: float | None = None,
                   title: str = "") -> Path:
    """Learned warp strengths per ground-truth group on the strength's whole range
    [0, ``max_strength``]: for each pre-training ``runs[(n, seed)] = {group: per-example
    strengths}``, a dot at the group mean and a bar over its 5-95% range, one row per group."""
    plt = _plt()
    groups = list(next(iter(runs.values())))
    ns = sorted({n for n, _ in runs})
    colors = dict(zip(ns, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.9 * len(groups)))
    keys = sorted(runs)
    offsets = np.linspace(-0.3, 0.3, len(keys)) if len(keys) > 1 else np.zeros(1)
    for off, (n, seed) in zip(offsets, keys):
        for i, g in enumerate(groups):
            v = np.asarray(runs[(n, seed)][g], dtype=float)
            lo, hi = np.percentile(v, [5, 95])
            ax.plot([lo, hi], [i + off, i + off], color=colors[n], lw=1)
            ax.plot(v.mean(), i + off, "o", ms=3, color=colors[n])
    for n in ns:
        ax.plot([], [], "o-", ms=3, lw=1, color=colors[n], label=f"N = {n}")
    if init is not None:
        ax.axvline(init, color="gray", ls="--", lw=0.8, label=f"initial strength {init:g}")
    ax.set_xlim(0, max_strength)
    ax.set_yticks(range(len(groups)), groups)
    ax.set_ylim(-0.5, len(groups) - 0.5)
    ax.set_xlabel("learned warp strength w(x; phi) (samples^2), full range of phi's output")
    ax.set_title(title or "Learned warp strengths by ground-truth group", fontsize=9)
    ax.text(0.99, 0.01, f"{len(keys)} pre-trainings; dot = group mean, bar = 5-95% of test "
            "records", transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
