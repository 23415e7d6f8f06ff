"""Small-loss heuristic for the noisy-label experiment: weight PT examples by inverse PT loss.

Networks fit clean labels before they memorise noisy ones, so early in plain PT a noisy
example tends to have a larger loss. The heuristic weight of PT example i is

    w_i = (1 / (l_i + eps)) / mean_j (1 / (l_j + eps)),

with l_i = CE(f(x_i; theta), y_i) under plain-PT parameters theta (the same network as
``NoisyTask``'s PT classifier; Meta-PT's weight net is what it is compared with). The weights
have mean 1; the clean / noisy AUROC of ``weight_stats`` is scale-free, the mean ratio is not
(it grows as ``eps`` shrinks).

Protocol, fixed before the reported runs: theta = plain PT at the end of Meta-PT's warm-up
(``cfg.warmup`` outer iterations: the data Meta-PT has seen when it starts to learn weights)
and ``eps = 1e-2``; also reported, theta at the end of the plain-PT baseline (as many PT steps
as Meta-PT's whole run).

>>> import numpy as np
>>> inverse_loss_weights(np.array([0.0, 2.0]), eps=1.0).tolist()
[1.5, 0.5]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models import digits as M

__all__ = ["inverse_loss_weights", "pt_example_losses", "small_loss_weights"]


def inverse_loss_weights(losses: object, eps: float = 1e-2) -> np.ndarray:
    """``1 / (l + eps)`` normalised to mean 1; losses must be finite and >= 0."""
    a = np.asarray(losses, dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"`losses` must be a non-empty vector, got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(
            f"`losses` must be finite and >= 0 (per-example CE), got min {np.nanmin(a)}, "
            f"{int((~np.isfinite(a)).sum())} non-finite"
        )
    if not eps > 0:
        raise ValueError(f"`eps` must be > 0, got {eps}")
    inv = 1.0 / (a + eps)
    return inv / inv.mean()


@torch.no_grad()
def pt_example_losses(task: Any, pt_params: dict[str, torch.Tensor]) -> np.ndarray:
    """Per-example CE of ``task``'s PT classifier with ``pt_params`` on every PT example (its
    possibly noisy labels), in the PT example order of ``task.noisy``."""
    logits = M.linear(pt_params, "pt", M.features(pt_params, task.x_pt, task.cfg.act))
    return F.cross_entropy(logits, task.y_pt, reduction="none").cpu().numpy()


def small_loss_weights(
    task: Any, pt_params: dict[str, torch.Tensor], eps: float = 1e-2
) -> np.ndarray:
    """The heuristic's weight of every PT example under plain-PT parameters ``pt_params``."""
    return inverse_loss_weights(pt_example_losses(task, pt_params), eps)
