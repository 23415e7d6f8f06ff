"""Fine-tuning and evaluation: the whole encoder plus a new linear head on D_FT-train, early
stopping on the D_FT-val macro AUROC, test macro AUROC of the best epoch (No PT =
``finetune(None, ...)``)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.resnet1d import RESNET_CONFIGS, LinearHead, ResNet1d
from tasks.ecg.config import ECGConfig

__all__ = ["macro_auroc", "finetune", "seeded_generator"]


def seeded_generator(*keys: int) -> torch.Generator:
    """A ``torch.Generator`` seeded by a hash of the integer ``keys``."""
    s = 0
    for k in keys:
        s = (s * 1_000_003 + int(k)) % (2**62)
    return torch.Generator().manual_seed(s)


def macro_auroc(y: np.ndarray, score: np.ndarray) -> tuple[float, list[float]]:
    """Mean AUROC over the labels that have both classes in ``y`` (NaN for the others)."""
    from sklearn.metrics import roc_auc_score

    per = [float(roc_auc_score(y[:, j], score[:, j])) if 0 < y[:, j].sum() < len(y)
           else float("nan") for j in range(y.shape[1])]
    ok = [a for a in per if not np.isnan(a)]
    return (float(np.mean(ok)) if ok else float("nan")), per


def _predict(enc: nn.Module, head: nn.Module, x: Tensor, batch: int = 256) -> np.ndarray:
    enc.eval()
    with torch.no_grad():
        out = torch.cat([head(enc(x[i : i + batch])) for i in range(0, len(x), batch)])
    return out.cpu().numpy()


def finetune(
    enc_state: dict[str, Tensor] | None, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor], cfg: ECGConfig, seed: int,
) -> dict[str, Any]:
    """FT the whole encoder and a new linear head; early stopping on val macro AUROC."""
    torch.manual_seed(seed)
    dt = train[0].dtype
    dev = train[0].device  # initialised on the CPU (the same numbers anywhere), then moved
    enc = ResNet1d(train[0].shape[1], **RESNET_CONFIGS[cfg.encoder]).to(dev, dt)
    if enc_state is not None:
        enc.load_state_dict(enc_state)
    head = LinearHead(enc.feature_dim, train[1].shape[1]).to(dev, dt)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=cfg.ft_lr)
    g = seeded_generator(seed, 7)
    best, best_epoch, best_state, curve = -np.inf, -1, None, []
    x, y = train
    for epoch in range(cfg.ft_epochs):
        enc.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.ft_batch):
            idx = perm[i : i + cfg.ft_batch]
            if len(idx) < 2:  # BatchNorm needs two examples
                continue
            loss = F.binary_cross_entropy_with_logits(head(enc(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        auc, _ = macro_auroc(val[1].cpu().numpy(), _predict(enc, head, val[0]))
        curve.append(auc)
        if auc > best:
            best, best_epoch = auc, epoch
            best_state = (copy.deepcopy(enc.state_dict()), copy.deepcopy(head.state_dict()))
        if epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None:
        enc.load_state_dict(best_state[0])
        head.load_state_dict(best_state[1])
    test_auc, per_label = macro_auroc(test[1].cpu().numpy(), _predict(enc, head, test[0]))
    return {"test_auroc": test_auc, "test_auroc_per_label": per_label, "val_auroc": best,
            "best_epoch": best_epoch, "epochs_run": len(curve), "val_curve": curve}
