"""Input validation shared by the public functions (internal).

Every check raises early with the argument's name, what was expected and what was received.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import tree


def tensor_tree(t: Any, name: str, *, floating: bool = True) -> list[torch.Tensor]:
    """The leaves of ``t``; raise ``TypeError`` unless they are (floating) tensors."""
    flat = tree.leaves(t)
    if not flat:
        raise ValueError(f"`{name}` must be a non-empty pytree of tensors, got {t!r}")
    for i, x in enumerate(flat):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}` must contain only tensors; leaf {i} is {type(x).__name__}")
        if floating and not x.is_floating_point():
            raise TypeError(
                f"`{name}` must hold floating-point tensors; leaf {i} has dtype {x.dtype}"
            )
    return flat


def same_dtype(flat: list[torch.Tensor], name: str, ref: list[torch.Tensor], ref_name: str) -> None:
    for i, (x, r) in enumerate(zip(flat, ref)):
        if x.dtype != r.dtype or x.device != r.device:
            raise TypeError(
                f"`{name}` leaf {i} has dtype {x.dtype} on {x.device} but `{ref_name}` leaf {i} "
                f"has {r.dtype} on {r.device}; cast one of them (hypergrad never casts silently)"
            )


def like(t: Any, name: str, ref: Any, ref_name: str) -> list[torch.Tensor]:
    """``t`` must be a tensor pytree of the structure, shapes, dtypes and devices of ``ref``."""
    flat = tensor_tree(t, name)
    tree.check_same_structure(ref, t, names=(ref_name, name))
    same_dtype(flat, name, tree.leaves(ref), ref_name)
    return flat


def finite(t: Any, name: str) -> None:
    for i, x in enumerate(tree.leaves(t)):
        if (
            isinstance(x, torch.Tensor)
            and x.is_floating_point()
            and not bool(torch.isfinite(x).all())
        ):
            raise ValueError(
                f"`{name}` leaf {i} (shape {tuple(x.shape)}) contains NaN or inf; "
                "a hypergradient at non-finite values is meaningless"
            )


def scalar_loss(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must return a scalar tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"`{name}` must return a scalar (one-element) tensor, got shape {tuple(value.shape)}; "
            "reduce it, e.g. with .mean()"
        )
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must return a floating-point tensor, got {value.dtype}")
    return value.reshape(())


def nonneg_number(x: Any, name: str) -> float:
    if isinstance(x, torch.Tensor):
        x = float(x)
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {x!r}")
    return float(x)


def positive_number(x: Any, name: str) -> float:
    if isinstance(x, torch.Tensor):
        x = float(x)
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {x!r}")
    return float(x)


def nonneg_int(x: Any, name: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {x!r}")
    return x


def positive_int(x: Any, name: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x <= 0:
        raise ValueError(f"`{name}` must be an int > 0, got {x!r}")
    return x


def callable_(f: Any, name: str) -> None:
    if not callable(f):
        raise TypeError(f"`{name}` must be callable, got {type(f).__name__}")
