"""Differentiable image rotation with a reparameterised random angle.

Angles are in **degrees** throughout the synthetic task (phi, the FT angle 90, the 1-degree
standard deviation); they become radians only inside :func:`rotate`.

``rotate(x, angle)`` rotates each image about its centre by ``angle`` (positive = counter-
clockwise as displayed with row 0 at the top; ``rotate(x, 90)`` equals ``torch.rot90(x, 1,
dims=(-2, -1))`` on even-sized images) with ``affine_grid`` + bilinear ``grid_sample``, zeros
outside. It is differentiable in ``angle`` (the sampling grid moves smoothly with it), so a
hypergradient reaches the augmentation's mean through the rotated pixels.

The augmentation angle is reparameterised, ``angle_i = phi + std * eps_i`` with ``eps_i ~ N(0,
1)`` drawn from an explicit ``torch.Generator``: the noise is part of the batch, so every
Hessian-vector product of one hypergradient sees the same rotated images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rotate", "draw_noise", "sample_angles"]


def rotate(x: torch.Tensor, angle_deg: torch.Tensor | float) -> torch.Tensor:
    """Rotate ``x`` of shape ``(n, c, h, w)`` by ``angle_deg`` (scalar or ``(n,)``) degrees."""
    if x.dim() != 4:
        raise ValueError(f"`x` must have shape (n, c, h, w), got {tuple(x.shape)}")
    n = x.shape[0]
    a = torch.as_tensor(angle_deg, dtype=x.dtype, device=x.device)
    if a.dim() == 0:
        a = a.expand(n)
    if a.shape != (n,):
        raise ValueError(f"`angle_deg` must be a scalar or shape ({n},), got {tuple(a.shape)}")
    r = a * (math.pi / 180.0)
    c, s = torch.cos(r), torch.sin(r)
    z = torch.zeros_like(c)
    # affine_grid maps output coordinates (x right, y down, in [-1, 1]) to input coordinates;
    # sampling the input at R(-a) p shows the content rotated by +a on screen (y axis down).
    theta = torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1)], -2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def draw_noise(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """Standard-normal noise ``eps`` (``(n,)``) for :func:`sample_angles`, from ``generator``."""
    return torch.randn(n, generator=generator).to(dtype)


def sample_angles(mean_deg: torch.Tensor | float, eps: torch.Tensor, std_deg: float = 1.0
                  ) -> torch.Tensor:
    """Reparameterised angles ``mean + std * eps`` (degrees): differentiable in ``mean``."""
    return mean_deg + std_deg * eps
