"""The PT methods compared in Raghu et al. 2021, Table 1, all on the same GIN encoder.

* ``no_pt``: no pre-training (FT from random init).
* ``graph_sup_pt``: PT on all PT tasks with uniform weights (``MetaPretrainer(meta=False)``, so
  its PT steps are the very steps Meta-PT takes when phi is frozen).
* ``cotrain``, ``cotrain_pcgrad``, ``ift_cotrain``: the CoTrain baselines (cotrain.py).
* ``corr_pt``, ``oracle_pt``: Graph Sup PT's loop with fixed label-correlation / oracle task
  weights (fixed_weights.py).
* ``meta_pt``: L_PT = (1/T) sum_i 2 sigmoid(phi_i) BCE_i, phi learned online by
  ``hg.MetaPretrainer`` (P PT steps, then K head-only FT steps on D_FT(Meta)-train and the
  hypergradient of the D_FT(Meta)-val loss; IFT with a Neumann series whose step is the PT lr).

Every PT method returns the encoder's parameters; the FT protocol (finetune.py) is shared.
BatchNorm: PT losses use batch statistics and never write running statistics (Hessian
products must not change state); FT recalibrates them on the FT inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .baselines import weights_to_logits
from .config import METHODS, PT_METHODS, Settings
from .finetune import Problem
from .fixed_weights import FIXED_METHODS, fixed_weights
from .net import PTResult, build_trainer, strip_encoder

__all__ = ["PTResult", "pretrain", "PT_METHODS"]


def _meta_pretrain(
    problem: Problem, s: Settings, seed: int, fold: int | None, meta: bool,
    ckpt: Path | None, progress: bool, init_logit: torch.Tensor | None = None,
) -> PTResult:
    """Graph Sup PT (meta=False) or Meta-PT (meta=True) through ``hg.MetaPretrainer``."""
    trainer, pt_batch, ft_batch = build_trainer(problem, s, seed, fold, meta, init_logit)
    hist = trainer.run(s.meta_steps, pt_batch, ft_batch, checkpoint=ckpt,
                       checkpoint_every=max(1, s.meta_steps // 20), progress=progress)
    weights = (2 * torch.sigmoid(trainer.hparams["logit"].detach())).tolist()
    pt_time = float(np.sum([h["pt_time"] for h in hist]))
    meta_time = float(np.sum([h["meta_time"] for h in hist]))
    info = {
        "pt_step_time": pt_time / max(1, trainer.pt_steps_done),
        "meta_step_time": meta_time / max(1, trainer.meta_steps_done) if meta else 0.0,
        "total_time": pt_time + meta_time,
        "final_pt_loss": hist[-1]["pt_loss"] if hist else float("nan"),
        "val_loss": [h.get("val_loss") for h in hist][-10:] if meta else None,
    }
    return PTResult(strip_encoder(trainer.pt_params), weights if meta else None, info)


def pretrain(
    method: str,
    problem: Problem,
    s: Settings,
    seed: int,
    fold: int | None = None,
    ckpt: str | Path | None = None,
    progress: bool = True,
) -> PTResult:
    """Run the PT stage of ``method``; ``fold`` selects the partial-access held-out tasks."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    ckpt = Path(ckpt) if ckpt is not None else None
    if method == "no_pt":
        return PTResult(None)
    if method in ("graph_sup_pt", "meta_pt"):
        return _meta_pretrain(problem, s, seed, fold, method == "meta_pt", ckpt, progress)
    if method in FIXED_METHODS:  # Graph Sup PT's loop, phi = logit(w / 2) frozen
        w = fixed_weights(method, problem, fold)
        # the default dtype, as Graph Sup PT's torch.zeros logits (and the encoder's parameters)
        logit = torch.as_tensor(weights_to_logits(w), dtype=torch.get_default_dtype())
        res = _meta_pretrain(problem, s, seed, fold, False, ckpt, progress, init_logit=logit)
        res.weights = w.tolist()
        return res
    from .cotrain import cotrain

    variant = {"cotrain": "plain", "cotrain_pcgrad": "pcgrad", "ift_cotrain": "ift"}[method]
    return cotrain(problem, s, seed, fold, variant, ckpt, progress)
