"""What the rotation and noisy-label experiments share: batch generators, the meta learning
rate schedule, the classifier and its linear probe (the run mechanics are in tasks/harness.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from hypergrad import tree
from models import digits as M

__all__ = ["cosine_lr", "batch_generator", "linear_probe", "init_classifier", "ft_logits",
           "probe_accuracy"]


def batch_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """A generator determined by ``(seed, stream, index)``: batches are functions of the index."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + index) % 2**62)


def cosine_lr(trainer: Any, total: int, lr0: float, lr1: float) -> Callable[[int, dict], None]:
    """Callback setting the meta learning rate to a cosine decay from ``lr0`` to ``lr1``.

    Called after outer iteration ``j``, it sets the rate of iteration ``j + 1``; the rate lives
    in the meta optimizer's state, so a resumed run continues the schedule exactly.
    """

    def cb(j: int, metrics: dict) -> None:
        t = min(1.0, (j + 1) / max(1, total))
        lr = lr1 + 0.5 * (lr0 - lr1) * (1 + math.cos(math.pi * t))
        for group in trainer.meta_opt.param_groups:
            group["lr"] = lr

    return cb


def linear_probe(train_feats: torch.Tensor, train_y: torch.Tensor, test_feats: torch.Tensor,
                 test_y: torch.Tensor, steps: int = 300, lr: float = 1e-2,
                 weight_decay: float = 1e-4) -> float:
    """Test accuracy of a softmax-regression head fitted on frozen features (Adam, full batch)."""
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n_cls, train_feats.shape[1], generator=g, dtype=train_feats.dtype) * 0.01
         ).to(train_feats.device).requires_grad_()
    b = torch.zeros(n_cls, dtype=train_feats.dtype, device=train_feats.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(train_feats @ w.T + b, train_y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float(((test_feats @ w.T + b).argmax(1) == test_y).float().mean())


# --- the classifier shared by the rotation and noisy-label tasks ----------------------------

def init_classifier(kind: str, side: int, width: int, depth: int, ft_mode: str,
                    g: torch.Generator, dtype: torch.dtype
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PT network (encoder + 10-way PT head) and the FT head psi_FT.

    ``ft_mode="shared_head"``: FT continues the PT classifier; psi_FT is a per-class bias.
    ``"new_head"``: a new linear head.
    """
    p = M.init_params(kind, side, width, {"pt": 10, "ft": 10}, g, dtype, depth=depth)
    pt_params = {k: v for k, v in p.items() if not k.startswith("ft.")}
    ft_head = {k: v for k, v in p.items() if k.startswith("ft.")}
    if ft_mode == "shared_head":
        ft_head = {"ft.bias": torch.zeros(10, dtype=dtype)}
    elif ft_mode != "new_head":
        raise ValueError(f"`ft_mode` must be 'new_head' or 'shared_head', got {ft_mode!r}")
    return pt_params, ft_head


def ft_logits(enc: dict[str, torch.Tensor], head: dict[str, torch.Tensor], x: torch.Tensor,
              act: str) -> torch.Tensor:
    """FT logits: the PT classifier re-biased (shared head; ``enc`` is the whole PT network)
    or a new linear head on the encoder features."""
    if "ft.bias" in head and "ft.weight" not in head:
        return M.linear(enc, "pt", M.features(enc, x, act)) + head["ft.bias"]
    return M.linear(head, "ft", M.features(enc, x, act))


def probe_accuracy(pt_params: dict[str, torch.Tensor], ft: dict[str, tuple], act: str) -> float:
    """Test accuracy of a linear head fitted on the frozen encoder's FT-train features."""
    enc = M.encoder_part(tree.detach(pt_params))
    with torch.no_grad():
        f = {k: M.features(enc, x, act) for k, (x, _) in ft.items()}
    return linear_probe(f["train"], ft["train"][1], f["test"], ft["test"][1])
