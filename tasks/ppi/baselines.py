"""Trivial and oracle PT task weightings for the PPI table: what a learned weighting must beat.

* **Corr-weighted PT**: score PT task i by its largest absolute label correlation with any FT
  task visible to meta-learning, on the D_FT(Meta) graphs Meta-PT sees (the FT train subset):

      s_i = max_k |corr(y_PT[:, i], y_FT[:, k])|,    w_i = s_i / max_j s_j  in [0, 1].

  A PT task whose labels are constant on those graphs has no correlation (s_i = 0).
* **Oracle PT**: w_i = 1 for the PT tasks that are relevant by construction, 0 otherwise
  (synthetic data only: the ground truth ``relevance`` of ``synthetic_meta.json``).

Both are fixed weight vectors for Graph Sup PT's loop (L_PT = (1/T) sum_i w_i BCE_i); they are
pure functions of label matrices. :func:`weights_to_logits` maps a weight vector to the logits
phi of Meta-PT's ``2 sigmoid(phi)`` parametrisation (zero weights clipped to ``eps``).

>>> import numpy as np
>>> y_ft = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
>>> y_pt = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])  # task 0 = FT task 0
>>> label_correlation_scores(y_pt, y_ft).round(3).tolist()
[1.0, 0.0]
>>> oracle_weights([0, 1, 0]).tolist()
[0.0, 1.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .finetune import Problem

__all__ = [
    "label_correlation_scores",
    "corr_weights",
    "oracle_weights",
    "problem_labels",
    "corr_weights_for_problem",
    "weights_to_logits",
]


def _matrix(name: str, y: object) -> np.ndarray:
    a = np.asarray(y, dtype=float)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"`{name}` must be [graphs >= 2, tasks >= 1], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"`{name}` has non-finite entries")
    return a


def label_correlation_scores(y_pt: object, y_ft: object) -> np.ndarray:
    """s_i = max_k |Pearson corr(y_pt[:, i], y_ft[:, k])| over the rows (graphs) both share;
    columns constant on those rows count as uncorrelated (0). Shape [PT tasks]."""
    a, b = _matrix("y_pt", y_pt), _matrix("y_ft", y_ft)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"`y_pt` and `y_ft` must have the same graphs (rows), got {a.shape[0]} and {b.shape[0]}"
        )
    a = a - a.mean(0)
    b = b - b.mean(0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    # constant columns have zero norm: divide by 1 there, their centred column is all zeros
    corr = (a / np.where(na > 0, na, 1.0)).T @ (b / np.where(nb > 0, nb, 1.0))
    return np.abs(corr).max(1)


def corr_weights(y_pt: object, y_ft: object) -> np.ndarray:
    """Corr-weighted PT: ``s / max(s)`` of :func:`label_correlation_scores`, in [0, 1]."""
    s = label_correlation_scores(y_pt, y_ft)
    top = float(s.max())
    if top <= 0:
        raise ValueError(
            "no PT task correlates with any FT task on these graphs (all labels constant?); "
            "the correlation weighting is undefined"
        )
    return s / top


def oracle_weights(relevance: Sequence[int] | np.ndarray) -> np.ndarray:
    """Oracle PT: 1 for relevant PT tasks, 0 for the rest (``relevance`` is 0/1 per task)."""
    r = np.asarray(relevance)
    if r.ndim != 1 or r.size == 0 or not np.isin(r, (0, 1)).all():
        raise ValueError(f"`relevance` must be a non-empty 0/1 vector, got {r.tolist()[:10]}")
    if not r.any():
        raise ValueError("`relevance` marks no PT task relevant: the oracle weighting is empty")
    return r.astype(float)


def problem_labels(problem: Problem, fold: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(y_PT, y_FT) on D_FT(Meta) (the FT train subset: meta-train and meta-val), FT columns
    restricted to the tasks meta-learning may see (all, or all but ``fold``'s held-out ones)."""
    idx = problem.ft_train
    tasks = problem.meta_tasks(fold)
    y_pt = problem.store.y_pt[idx].cpu().numpy()
    y_ft = problem.store.y_ft[idx][:, tasks].cpu().numpy()
    return y_pt, y_ft


def corr_weights_for_problem(problem: Problem, fold: int | None = None) -> np.ndarray:
    """Corr-weighted PT's weights on exactly the labels Meta-PT sees for ``fold``."""
    return corr_weights(*problem_labels(problem, fold))


def weights_to_logits(w: object, scale: float = 2.0, eps: float = 1e-6) -> np.ndarray:
    """phi with ``scale * sigmoid(phi) = w``, weights clipped to ``[eps, scale - eps]``."""
    a = np.asarray(w, dtype=float)
    if scale <= 0 or not 0 < eps < scale / 2:
        raise ValueError(f"need scale > 0 and 0 < eps < scale / 2, got {scale}, {eps}")
    if not np.isfinite(a).all() or (a < 0).any() or (a > scale).any():
        raise ValueError(f"weights must lie in [0, {scale}], got min {a.min()}, max {a.max()}")
    p = np.clip(a, eps, scale - eps) / scale
    return np.log(p) - np.log1p(-p)
