"""The task weights of Corr-weighted PT and Oracle PT (run by ``methods.pretrain``).

L_PT = (1/T) sum_i w_i BCE_i with w from ``baselines.py`` (Corr-weighted PT: max |label corr|
with a visible FT task on D_FT(Meta), scaled to max 1; Oracle PT: 1 on the relevant tasks, 0
elsewhere), through ``MetaPretrainer(meta=False)`` with phi = logit(w / 2) frozen: the very PT
steps of Graph Sup PT (w = 1) and of Meta-PT with phi frozen, so only the weighting differs.
"""

from __future__ import annotations

import numpy as np

from .baselines import corr_weights_for_problem, oracle_weights
from .finetune import Problem

__all__ = ["FIXED_METHODS", "fixed_weights"]

FIXED_METHODS = ("corr_pt", "oracle_pt")


def fixed_weights(method: str, problem: Problem, fold: int | None = None) -> np.ndarray:
    """The weight vector of ``method`` (``corr_pt`` or ``oracle_pt``) for ``fold``."""
    if method == "corr_pt":
        return corr_weights_for_problem(problem, fold)
    if method == "oracle_pt":
        if problem.relevance is None:
            raise ValueError("`oracle_pt` needs the ground-truth relevance (synthetic data only)")
        return oracle_weights(problem.relevance)
    raise ValueError(f"`method` must be one of {FIXED_METHODS}, got {method!r}")

