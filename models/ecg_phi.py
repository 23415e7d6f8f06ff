"""phi: a 4-layer 1-D CNN mapping an ECG to its per-example warp strength w(x; phi) > 0.

As in the authors' model (four stride-2 convolutions, kernel 15, global average pooling, a
linear layer): the output is ``max_strength * sigmoid(z)``, initialised so that every example
starts near ``init_strength`` (the last layer's weights start at zero). GroupNorm instead of
BatchNorm keeps each example's strength independent of the rest of its batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["WarpStrengthNet"]


class WarpStrengthNet(nn.Module):
    """``(B, leads, time) -> (B,)`` positive warp strengths (variance of the warp velocity)."""

    def __init__(
        self, in_leads: int = 12, channels: int = 32, kernel: int = 15, *,
        init_strength: float = 25.0, max_strength: float = 100.0,
    ) -> None:
        super().__init__()
        if not 0 < init_strength < max_strength:
            raise ValueError(
                f"need 0 < `init_strength` < `max_strength`, got {init_strength}, {max_strength}"
            )
        layers: list[nn.Module] = []
        c = in_leads
        for _ in range(4):
            layers += [nn.Conv1d(c, channels, kernel, stride=2, padding=kernel // 2),
                       nn.GroupNorm(4 if channels % 4 == 0 else 1, channels), nn.ReLU()]
            c = channels
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(channels, 1)
        self.max_strength = float(max_strength)
        self.init_strength = float(init_strength)
        # fixed per-channel standardisation of the pooled features (identity until calibrate)
        self.register_buffer("feat_mean", torch.zeros(channels))
        self.register_buffer("feat_std", torch.ones(channels))
        with torch.no_grad():
            self.out.weight.zero_()
            p = init_strength / max_strength
            self.out.bias.fill_(math.log(p / (1 - p)))

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Fix the standardisation of the pooled features to their mean/std over ``x`` (e.g.
        part of the PT pool, at initialisation). The output layer then sees only between-example
        variation, not the common mode, which otherwise dominates its gradient."""
        f = self.features(x).mean(-1)
        self.feat_mean.copy_(f.mean(0))
        self.feat_std.copy_(f.std(0).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        f = (self.features(x).mean(-1) - self.feat_mean) / self.feat_std
        return self.max_strength * torch.sigmoid(self.out(f).squeeze(-1))
