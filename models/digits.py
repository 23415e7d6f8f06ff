"""Small encoders for 8x8 digits (padded to 12x12) and 28x28 MNIST, used functionally.

Parameters live in plain dicts (``torch.func`` style): :func:`init_params` builds one dict with
the encoder under ``"enc.*"`` and named linear heads under ``"<head>.weight"`` / ``"<head>.bias"``;
:func:`features` and :func:`linear` evaluate them. The MLP sees every pixel position, so it is
rotation-sensitive by construction (what the rotation experiment needs); the CNN is there for
MNIST-sized inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["init_params", "init_linear", "features", "linear", "encoder_part", "ACTIVATIONS"]

ACTIVATIONS = {"relu": F.relu, "elu": F.elu, "tanh": torch.tanh, "softplus": F.softplus}


def _uniform(shape: tuple[int, ...], fan_in: int, g: torch.Generator, dtype: torch.dtype):
    bound = 1.0 / math.sqrt(fan_in)  # PyTorch's default Linear/Conv init
    return (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * bound


def init_linear(name: str, n_in: int, n_out: int, g: torch.Generator, dtype: torch.dtype
                ) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": _uniform((n_out, n_in), n_in, g, dtype),
            f"{name}.bias": _uniform((n_out,), n_in, g, dtype)}


def init_params(
    kind: str, side: int, width: int, heads: dict[str, int], g: torch.Generator,
    dtype: torch.dtype = torch.float32, depth: int = 2, prefix: str = "enc",
) -> dict[str, torch.Tensor]:
    """Encoder ``kind`` ("mlp" or "cnn") with ``width`` features, plus the given linear heads.

    The encoder's entries are named ``"<prefix>.*"`` (another prefix gives a second network,
    e.g. the noisy-label weight net, that :func:`features` evaluates with the same prefix).
    """
    p: dict[str, torch.Tensor] = {}
    if kind == "mlp":
        n_in = side * side
        for i in range(depth):
            p.update(init_linear(f"{prefix}.fc{i}", n_in, width, g, dtype))
            n_in = width
    elif kind == "cnn":
        c1, c2 = 16, width
        p[f"{prefix}.conv0.weight"] = _uniform((c1, 1, 3, 3), 9, g, dtype)
        p[f"{prefix}.conv0.bias"] = _uniform((c1,), 9, g, dtype)
        p[f"{prefix}.conv1.weight"] = _uniform((c2, c1, 3, 3), 9 * c1, g, dtype)
        p[f"{prefix}.conv1.bias"] = _uniform((c2,), 9 * c1, g, dtype)
    else:
        raise ValueError(f"`kind` must be 'mlp' or 'cnn', got {kind!r}")
    for name, n_out in heads.items():
        p.update(init_linear(name, width, n_out, g, dtype))
    return p


def encoder_part(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``"enc.*"`` entries (what fine-tuning shares with pre-training)."""
    return {k: v for k, v in params.items() if k.startswith("enc.")}


def features(params: dict[str, torch.Tensor], x: torch.Tensor, act: str = "elu",
             prefix: str = "enc") -> torch.Tensor:
    """Encoder output ``(n, width)`` for images ``x`` of shape ``(n, 1, side, side)``."""
    f = ACTIVATIONS[act]
    e = prefix
    if f"{e}.conv0.weight" in params:
        h = f(F.conv2d(x, params[f"{e}.conv0.weight"], params[f"{e}.conv0.bias"], padding=1))
        h = F.avg_pool2d(h, 2)
        h = f(F.conv2d(h, params[f"{e}.conv1.weight"], params[f"{e}.conv1.bias"], padding=1))
        return h.mean(dim=(-2, -1))
    h = x.flatten(1)
    i = 0
    while f"{e}.fc{i}.weight" in params:
        h = f(F.linear(h, params[f"{e}.fc{i}.weight"], params[f"{e}.fc{i}.bias"]))
        i += 1
    return h


def linear(params: dict[str, torch.Tensor], name: str, h: torch.Tensor) -> torch.Tensor:
    return F.linear(h, params[f"{name}.weight"], params[f"{name}.bias"])
