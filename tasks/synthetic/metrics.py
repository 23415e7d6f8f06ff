"""Scores of the noisy-label experiment: AUROC and the clean / noisy weight statistics."""

from __future__ import annotations

import numpy as np

__all__ = ["auroc", "weight_stats"]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (probability a positive outranks a negative; ties count 1/2)."""
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=float)
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def weight_stats(w: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    clean_w, noisy_w = w[~noisy], w[noisy]
    return {
        "mean_weight_clean": float(clean_w.mean()), "mean_weight_noisy": float(noisy_w.mean()),
        "ratio": float(clean_w.mean() / max(noisy_w.mean(), 1e-30)),
        "median_ratio": float(np.median(clean_w) / max(np.median(noisy_w), 1e-30)),
        "auroc": auroc(w, ~noisy),
    }
