"""1-D ResNet encoder over 12 ECG leads, SimCLR projection head and linear label head.

``ResNet1d(**RESNET_CONFIGS["paper"])`` is the authors' ResNet-18 (BasicBlocks [2, 2, 2, 2],
widths 32-64-128-256, kernel 15, stride-2 stem); ``"small"`` (the CPU default) and ``"tiny"``
(tests) keep the structure with fewer channels and blocks.

BatchNorm and second-order products: ``functional_forward`` evaluates a module with explicit
parameters and *copies* of its buffers, so a forward used inside Hessian-vector products (or
repeated at every matvec) never updates the module's running statistics. Call
:func:`recompute_bn_stats` after functional training to refresh them on data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "RESNET_CONFIGS",
    "BasicBlock1d",
    "ResNet1d",
    "ProjectionHead",
    "LinearHead",
    "functional_forward",
    "recompute_bn_stats",
]

RESNET_CONFIGS: dict[str, dict] = {
    "paper": {"widths": (32, 64, 128, 256), "blocks": (2, 2, 2, 2), "kernel": 15},
    "small": {"widths": (16, 32, 48, 64), "blocks": (1, 1, 1, 1), "kernel": 9, "stem_pool": 2},
    "tiny": {"widths": (8, 8, 16, 16), "blocks": (1, 1, 1, 1), "kernel": 5, "stem_pool": 4},
}


class BasicBlock1d(nn.Module):
    """conv-BN-ReLU-conv-BN plus (projected) identity, then ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(
                nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm1d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet1d(nn.Module):
    """Encoder ``(B, leads, time) -> (B, widths[-1])`` (global average pooled features)."""

    def __init__(
        self, in_leads: int = 12, widths: tuple[int, ...] = (16, 32, 48, 64),
        blocks: tuple[int, ...] = (1, 1, 1, 1), kernel: int = 9, stem_pool: int = 1,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"`widths` {widths} and `blocks` {blocks} must be equally long")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"`kernel` must be odd and positive, got {kernel}")
        self.in_leads = in_leads
        self.stem = nn.Sequential(
            nn.Conv1d(in_leads, widths[0], kernel, stride=2, padding=kernel // 2, bias=False),
            nn.BatchNorm1d(widths[0]),
            nn.ReLU(),
            *([nn.MaxPool1d(stem_pool)] if stem_pool > 1 else []),
        )
        layers: list[nn.Module] = []
        c = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock1d(c, w, kernel, stride=2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.feature_dim = c
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.in_leads:
            raise ValueError(
                f"`x` must have shape (batch, {self.in_leads}, time), got {tuple(x.shape)}"
            )
        return self.layers(self.stem(x)).mean(-1)


class ProjectionHead(nn.Module):
    """SimCLR projection: Linear (no bias) - ReLU - Linear to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim, bias=False), nn.ReLU(),
                                 nn.Linear(in_dim, out_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class LinearHead(nn.Module):
    """Linear map from features to ``n_labels`` logits."""

    def __init__(self, in_dim: int, n_labels: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, n_labels)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(h)


def functional_forward(
    module: nn.Module, params: dict[str, Tensor], x: Tensor,
    buffers: dict[str, Tensor] | None = None,
) -> Tensor:
    """``module(x)`` with ``params`` and copies of ``buffers`` (default: the module's own).

    In train mode BatchNorm uses batch statistics and updates only the copies, so the call is
    free of side effects: safe inside Hessian-vector products.
    """
    bufs = dict(module.named_buffers()) if buffers is None else buffers
    state = {**{k: v.clone() for k, v in bufs.items()}, **params}
    return functional_call(module, state, (x,))


@torch.no_grad()
def recompute_bn_stats(module: nn.Module, x: Tensor, batch_size: int = 256) -> None:
    """Reset BatchNorm running statistics and re-estimate them (cumulative average) on ``x``."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    was_training = module.training
    module.train()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    for i in range(0, len(x), batch_size):
        module(x[i : i + batch_size])
    for m, (mom, _) in zip(bns, saved):
        m.momentum = mom
    module.train(was_training)
