"""The data problem of one run and the fine-tuning protocol shared by every method.

FT protocol (Hu et al. / Raghu et al.): a new linear head on the graph representation, then
either fine-tuning of the whole network (``full``) or of the head on frozen features
(``linear``), Adam, early stopping on validation macro AUROC (over all FT tasks), test AUROC at
the best validation epoch. AUROC per FT task by ``sklearn.metrics.roc_auc_score``; tasks with
one class in a split are skipped (NaN), the macro mean ignores them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from models.gin import GINEncoder

from .config import Settings
from .data import GraphStore
from .splits import PPISplit, species_split

__all__ = ["Problem", "make_problem", "per_task_auroc", "macro", "finetune", "encoder_from"]


@dataclass
class Problem:
    """Data of a run: the store, Hu et al.'s split, the FT train subset and its meta split,
    the partial-access folds of held-out FT tasks, and (synthetic only) PT task relevance."""

    store: GraphStore
    split: PPISplit
    ft_train: torch.Tensor
    meta_train: torch.Tensor
    meta_val: torch.Tensor
    folds: list[torch.Tensor]
    relevance: list[int] | None = None

    def meta_tasks(self, fold: int | None) -> torch.Tensor:
        """FT tasks visible to meta-learning / CoTrain: all (fold None) or all but a fold's."""
        all_tasks = torch.arange(self.store.num_ft_tasks)
        if fold is None:
            return all_tasks
        keep = torch.ones(self.store.num_ft_tasks, dtype=torch.bool)
        keep[self.folds[fold]] = False
        return all_tasks[keep]


def make_problem(
    store: GraphStore, s: Settings, relevance: list[int] | None = None, split_seed: int = 42
) -> Problem:
    """Species split, FT-train subsample (fixed by ``split_seed``), meta-train/val halves, folds."""
    split = species_split(store, seed=split_seed)
    g = torch.Generator().manual_seed(split_seed)
    ft_train = split.train[torch.randperm(split.train.numel(), generator=g)]
    if s.ft_train_size is not None:
        if s.ft_train_size > ft_train.numel():
            raise ValueError(
                f"`ft_train_size` {s.ft_train_size} exceeds the {ft_train.numel()} train graphs"
            )
        ft_train = ft_train[: s.ft_train_size]
    n_val = max(1, int(round(s.meta_val_frac * ft_train.numel())))
    if n_val >= ft_train.numel():
        raise ValueError(f"FT train subset of {ft_train.numel()} graphs is too small to split")
    perm = torch.randperm(store.num_ft_tasks, generator=torch.Generator().manual_seed(0))
    folds = [f for f in torch.tensor_split(perm, s.n_folds) if f.numel()]
    return Problem(store, split, ft_train, ft_train[n_val:], ft_train[:n_val], folds, relevance)


def per_task_auroc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each column; NaN where the column has one class only."""
    out = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        if 0 < y[:, j].sum() < y.shape[0]:
            out[j] = roc_auc_score(y[:, j], scores[:, j])
    return out


def macro(aucs: np.ndarray, tasks: torch.Tensor | np.ndarray | None = None) -> float:
    a = np.asarray(aucs, dtype=float)
    if tasks is not None:
        a = a[np.asarray(tasks)]
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def encoder_from(params: dict[str, torch.Tensor] | None, s: Settings) -> GINEncoder:
    """A GIN encoder module holding ``params`` (``None``: random init from the global seed)."""
    enc = GINEncoder(s.gin)
    if params is not None:
        missing = set(dict(enc.named_parameters())) - set(params)
        if missing:
            raise ValueError(f"`params` lack encoder parameters {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, p in enc.named_parameters():
                p.copy_(params[name])
    return enc


@torch.no_grad()
def _recalibrate_bn(enc: GINEncoder, store: GraphStore, idx: torch.Tensor, bs: int) -> None:
    """Running BatchNorm statistics = exact averages over ``idx`` (PT never updates them)."""
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm1d)]
    moms = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    enc.train()
    for chunk in torch.split(idx, bs):
        if chunk.numel() > 1:
            enc(*store.batch(chunk).inputs())
    for m, mom in zip(bns, moms):
        m.momentum = mom


@torch.no_grad()
def _scores(enc: GINEncoder, head: nn.Linear, store: GraphStore, idx: torch.Tensor, bs: int):
    enc.eval()
    outs = [head(enc(*store.batch(c).inputs())) for c in torch.split(idx, bs)]
    return torch.cat(outs).cpu().numpy(), store.y_ft[idx].numpy()


def finetune(
    enc_params: dict[str, torch.Tensor] | None,
    problem: Problem,
    s: Settings,
    mode: str,
    seed: int,
) -> dict[str, object]:
    """Run the FT protocol; returns per-task AUROC on valid / test_hard / test_easy at the best
    validation epoch, the best epoch and the validation curve."""
    if mode not in ("full", "linear"):
        raise ValueError(f"`mode` must be 'full' or 'linear', got {mode!r}")
    torch.manual_seed(seed)
    store, sp = problem.store, problem.split
    enc = encoder_from(enc_params, s).to(store.device)
    _recalibrate_bn(enc, store, problem.ft_train, s.eval_batch_size)
    head = nn.Linear(s.gin.repr_dim, store.num_ft_tasks).to(store.device)
    y_ft = store.y_ft.to(store.device)
    g = torch.Generator().manual_seed(10_000 + seed)
    if mode == "linear":
        enc.eval()
        with torch.no_grad():
            feats = {k: torch.cat([enc(*store.batch(c).inputs()) for c in
                                   torch.split(getattr(sp, k) if k != "train" else
                                               problem.ft_train, s.eval_batch_size)])
                     for k in ("train", "valid", "test_hard", "test_easy")}
        params = list(head.parameters())
        lr = s.ft_lr_linear
    else:
        params = list(enc.parameters()) + list(head.parameters())
        lr = s.ft_lr_full
    opt = torch.optim.Adam(params, lr=lr)
    tr = problem.ft_train
    best, best_epoch, since, curve = -1.0, -1, 0, []
    best_state = None
    for epoch in range(s.ft_epochs):
        order = torch.randperm(tr.numel(), generator=g)
        if mode == "full":
            enc.train()
        for pos in torch.split(order, s.ft_batch_size):
            c = tr[pos]
            if mode == "linear":
                logits = head(feats["train"][pos.to(store.device)])
            else:
                if c.numel() < 2:  # BatchNorm needs 2 graphs
                    continue
                logits = head(enc(*store.batch(c).inputs()))
            loss = F.binary_cross_entropy_with_logits(logits, y_ft[c.to(store.device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if mode == "linear":
            with torch.no_grad():
                sv, yv = head(feats["valid"]).cpu().numpy(), store.y_ft[sp.valid].numpy()
        else:
            sv, yv = _scores(enc, head, store, sp.valid, s.eval_batch_size)
        val = macro(per_task_auroc(yv, sv))
        curve.append(val)
        if val > best:
            best, best_epoch, since = val, epoch, 0
            best_state = (copy.deepcopy(enc.state_dict()) if mode == "full" else None,
                          copy.deepcopy(head.state_dict()))
        else:
            since += 1
            if since >= s.ft_patience:
                break
    if best_state is not None:
        if best_state[0] is not None:
            enc.load_state_dict(best_state[0])
        head.load_state_dict(best_state[1])
    out: dict[str, object] = {"best_epoch": best_epoch, "val_curve": curve}
    for k in ("valid", "test_hard", "test_easy"):
        if mode == "linear":
            with torch.no_grad():
                sc = head(feats[k]).cpu().numpy()
            y = store.y_ft[getattr(sp, k)].numpy()
        else:
            sc, y = _scores(enc, head, store, getattr(sp, k), s.eval_batch_size)
        out[k] = per_task_auroc(y, sc).tolist()
    return out

