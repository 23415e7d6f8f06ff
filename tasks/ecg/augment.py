"""ECG augmentations of the paper's SimCLR pipeline, differentiable in their strengths.

Applied in the paper's order: random crop (a randomly placed segment of each lead zeroed),
jitter (iid Gaussian noise), diffeomorphic temporal warp. Signals are ``(batch, leads, time)``.
Strengths are tensors broadcastable to ``(batch,)``; gradients flow from the output to them, so a
per-example warp strength ``w(x; phi)`` can be learned by a hypergradient.

All randomness comes from an explicit ``torch.Generator``: a hypergradient rebuilds the PT loss
with the same generator seed, so every Hessian-vector product sees the same augmentation.

The temporal warp (voxelmorph's recipe, 1-D): a stationary velocity field ``v(t) ~ N(0, s)``
per time step, smoothed by a Gaussian kernel normalised to unit L2 norm (so the smoothed field
still has variance ``s`` in samples^2 at every time step), integrated over unit time by scaling
and squaring (``u <- u + u o (id + u)``) into a displacement ``u``, and applied by linear
resampling ``x'(t) = x(t + u(t))``. The number of squarings is raised until the first step is
monotone, so the discrete warp never reverses time. Resampling is a hand-written gather + lerp
(first-order differentiable in the positions, double-backward safe).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "lerp_sample",
    "smooth_velocity",
    "integrate_velocity",
    "warp_displacement",
    "temporal_warp",
    "random_crop",
    "jitter",
    "augment",
]


def _strength(strength: Tensor | float, x: Tensor, name: str) -> Tensor:
    """``strength`` as a ``(batch,)`` tensor in ``x``'s dtype; checked non-negative."""
    s = torch.as_tensor(strength, dtype=x.dtype, device=x.device)
    if s.dim() > 1 or (s.dim() == 1 and s.shape[0] not in (1, x.shape[0])):
        raise ValueError(
            f"`{name}` must be a scalar or shape ({x.shape[0]},) for a batch of {x.shape[0]}, "
            f"got shape {tuple(s.shape)}"
        )
    if bool((s.detach() < 0).any()):
        raise ValueError(f"`{name}` must be >= 0, got min {float(s.detach().min()):.4g}")
    return s.expand(x.shape[0]) if s.dim() == 1 else s.reshape(1).expand(x.shape[0])


def _check_signal(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(
            f"`{name}` must be a float tensor (batch, leads, time), got "
            f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        )


def lerp_sample(x: Tensor, pos: Tensor, padding: str = "zeros") -> Tensor:
    """Sample ``x`` (B, C, L) at fractional positions ``pos`` (B, L') by linear interpolation.

    ``padding="zeros"`` gives 0 outside ``[0, L-1]`` (grid_sample's zeros padding with
    ``align_corners=True``); ``"border"`` clamps positions into the signal.
    """
    L = x.shape[-1]
    if padding == "border":
        pos = pos.clamp(0, L - 1)
    elif padding != "zeros":
        raise ValueError(f"`padding` must be 'zeros' or 'border', got {padding!r}")
    fl = torch.floor(pos.detach())
    w = (pos - fl).unsqueeze(1)  # differentiable in pos
    i0 = fl.long()
    i1 = i0 + 1
    idx0 = i0.clamp(0, L - 1).unsqueeze(1).expand(-1, x.shape[1], -1)
    idx1 = i1.clamp(0, L - 1).unsqueeze(1).expand(-1, x.shape[1], -1)
    x0 = torch.gather(x, 2, idx0)
    x1 = torch.gather(x, 2, idx1)
    if padding == "zeros":
        x0 = x0 * ((i0 >= 0) & (i0 <= L - 1)).unsqueeze(1).to(x.dtype)
        x1 = x1 * ((i1 >= 0) & (i1 <= L - 1)).unsqueeze(1).to(x.dtype)
    return x0 + w * (x1 - x0)


def _gauss_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    half = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-half, half + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.norm()  # unit L2 norm: white noise of variance s stays variance s


def smooth_velocity(noise: Tensor, sigma: float) -> Tensor:
    """Convolve white noise (B, L) with a unit-L2-norm Gaussian of std ``sigma`` samples."""
    if sigma <= 0:
        return noise
    k = _gauss_kernel(sigma, noise.dtype, noise.device)
    pad = k.numel() // 2
    out = F.conv1d(F.pad(noise.unsqueeze(1), (pad, pad), mode="reflect"), k.view(1, 1, -1))
    return out.squeeze(1)


def integrate_velocity(v: Tensor, steps: int | None = None, min_steps: int = 4) -> Tensor:
    """Scaling and squaring of a stationary velocity ``v`` (B, L), in samples, over unit time.

    ``steps=None`` picks the number of squarings so that the first step
    ``t -> t + v(t) / 2**steps`` is strictly increasing (hence so is every composition).
    """
    if steps is None:
        dv = (v.detach()[:, 1:] - v.detach()[:, :-1]).abs().max() if v.shape[1] > 1 else 0.0
        need = math.log2(max(float(dv), 1e-12) / 0.5) if float(dv) > 0 else 0.0
        steps = max(min_steps, int(math.ceil(need)))
    grid = torch.arange(v.shape[1], dtype=v.dtype, device=v.device).expand_as(v)
    u = v / (2**steps)
    for _ in range(steps):
        u = u + lerp_sample(u.unsqueeze(1), grid + u, padding="border").squeeze(1)
    return u


def warp_displacement(
    strength: Tensor, batch: int, length: int, generator: torch.Generator, *,
    sigma: float = 15.0, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
) -> Tensor:
    """Displacement field (B, L) of the diffeomorphic warp with velocity variance ``strength``."""
    eps = torch.randn(batch, length, generator=generator, dtype=dtype).to(device)
    v = torch.sqrt(strength.clamp_min(0)).unsqueeze(1) * smooth_velocity(eps, sigma)
    return integrate_velocity(v)


def temporal_warp(
    x: Tensor, strength: Tensor | float, generator: torch.Generator, *, sigma: float = 15.0,
    return_positions: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Warp ``x`` (B, C, L) in time: ``x'(t) = x(t + u(t))``, ``u`` as in the module docstring.

    ``strength`` is the per-example variance of the velocity (samples^2); 0 is the identity.
    """
    _check_signal(x)
    s = _strength(strength, x, "strength")
    B, _, L = x.shape
    u = warp_displacement(s, B, L, generator, sigma=sigma, dtype=x.dtype, device=x.device)
    pos = torch.arange(L, dtype=x.dtype, device=x.device) + u
    out = lerp_sample(x, pos, padding="zeros")
    return (out, pos) if return_positions else out


def random_crop(x: Tensor, strength: Tensor | float, generator: torch.Generator) -> Tensor:
    """Zero a random segment of each lead; its length is ``U(0, strength) * L`` (soft 1-sample
    edges, so the output is differentiable in ``strength``; 0 is the identity).

    The authors' pipeline crops up to half of each lead (``strength=0.5``).
    """
    _check_signal(x)
    s = _strength(strength, x, "strength")
    B, C, L = x.shape
    u = torch.rand(B, C, 1, generator=generator, dtype=x.dtype).to(x.device)
    r = torch.rand(B, C, 1, generator=generator, dtype=x.dtype).to(x.device)
    length = s.view(B, 1, 1) * u * L
    start = r * (L + length) - length  # the segment may hang over either end
    t = torch.arange(L, dtype=x.dtype, device=x.device).view(1, 1, L)
    box = torch.clamp(torch.minimum(t - start + 0.5, start + length - t - 0.5), 0.0, 1.0)
    return x * (1 - box)


def jitter(x: Tensor, strength: Tensor | float, generator: torch.Generator) -> Tensor:
    """Add iid Gaussian noise of std ``U(0, strength) * std(lead)`` (the authors' recipe)."""
    _check_signal(x)
    s = _strength(strength, x, "strength")
    B, C, L = x.shape
    u = torch.rand(B, 1, 1, generator=generator, dtype=x.dtype).to(x.device)
    eps = torch.randn(B, C, L, generator=generator, dtype=x.dtype).to(x.device)
    scale = x.detach().std(dim=-1, keepdim=True)
    return x + s.view(B, 1, 1) * u * scale * eps


def augment(
    x: Tensor, generator: torch.Generator, *, crop: Tensor | float = 0.5,
    noise: Tensor | float = 0.1, warp: Tensor | float = 0.0, warp_sigma: float = 15.0,
) -> Tensor:
    """The SimCLR view: crop, then jitter, then temporal warp (the paper's order)."""
    x = random_crop(x, crop, generator)
    x = jitter(x, noise, generator)
    return temporal_warp(x, warp, generator, sigma=warp_sigma)
