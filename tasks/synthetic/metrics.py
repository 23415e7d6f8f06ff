"""Scores of the noisy-label experiment: AUROC and the clean / noisy weight statistics."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["auroc", "weight_stats"]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (probability a positive outranks a negative; ties count 1/2),
    scikit-learn's ``roc_auc_score``; NaN when one class is absent."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, np.asarray(scores, dtype=float)))


def weight_stats(w: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    clean_w, noisy_w = w[~noisy], w[noisy]
    return {
        "mean_weight_clean": float(clean_w.mean()), "mean_weight_noisy": float(noisy_w.mean()),
        "ratio": float(clean_w.mean() / max(noisy_w.mean(), 1e-30)),
        "median_ratio": float(np.median(clean_w) / max(np.median(noisy_w), 1e-30)),
        "auroc": auroc(w, ~noisy),
    }
