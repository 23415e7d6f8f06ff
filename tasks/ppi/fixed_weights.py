"""Corr-weighted PT and Oracle PT as PT methods: Graph Sup PT's loop with fixed task weights.

L_PT = (1/T) sum_i w_i BCE_i with w from ``baselines.py`` (Corr-weighted PT: max |label corr|
with a visible FT task on D_FT(Meta), scaled to max 1; Oracle PT: 1 on the relevant tasks, 0
elsewhere), through ``MetaPretrainer(meta=False)`` with phi = logit(w / 2) frozen: the very PT
steps of Graph Sup PT (w = 1) and of Meta-PT with phi frozen, so only the weighting differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .baselines import corr_weights_for_problem, oracle_weights, weights_to_logits
from .config import Settings
from .finetune import Problem
from .methods import PTResult, _meta_pretrain

__all__ = ["FIXED_METHODS", "fixed_weights", "pretrain_fixed"]

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


def pretrain_fixed(
    method: str,
    problem: Problem,
    s: Settings,
    seed: int,
    fold: int | None = None,
    ckpt: str | Path | None = None,
    progress: bool = False,
) -> PTResult:
    """PT with ``method``'s fixed weights; the result carries them as ``weights``."""
    w = fixed_weights(method, problem, fold)
    # the default dtype, as Graph Sup PT's torch.zeros logits (and the encoder's parameters)
    logit = torch.as_tensor(weights_to_logits(w), dtype=torch.get_default_dtype())
    res = _meta_pretrain(
        problem,
        s,
        seed,
        fold,
        False,
        None if ckpt is None else Path(ckpt),
        progress,
        init_logit=logit,
    )
    res.weights = w.tolist()
    return res
