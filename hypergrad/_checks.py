"""Input validation shared by the public functions (internal).

Every check raises early with the argument's name, what was expected and what was received.
Structure, dtype and device checks are Python-only (free). Checks on *values* (NaN/inf) read
the device, so they are gathered: :class:`Health` collects every signal of one call as
tensors and reads them in one host transfer (one device synchronisation), after which the
errors and warnings are built from plain Python numbers. Internal calls skip validation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import tree

__all__ = [
    "HypergradientWarning",
    "HypergradientError",
    "DoubleBackwardError",
    "Health",
]


class HypergradientWarning(UserWarning):
    """The IFT premise or the linear solve failed: the hypergradient may be wrong."""


class HypergradientError(RuntimeError):
    """Raised instead of :class:`HypergradientWarning` when ``on_failure="raise"``."""


class DoubleBackwardError(HypergradientError):
    """A second-order product needs a double backward that the model does not implement."""


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


def nonfinite_message(name: str, index: int, x: torch.Tensor, what: str = "") -> str:
    return f"`{name}` leaf {index} (shape {tuple(x.shape)}) contains NaN/inf{what}"


def finite(t: Any, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` and the leaf if any leaf holds NaN/inf.

    One host read for the whole tree (not one per leaf)."""
    flat = [x for x in tree.leaves(t) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not flat:
        return
    health = Health()
    health.add_finite(name, flat)
    health.read()
    health.raise_nonfinite(name, flat, "; a hypergradient at non-finite values is meaningless")


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


def _number(x: Any, name: str, rule: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"`{name}` must be a number {rule}, got a tensor of shape "
                             f"{tuple(x.shape)}")
        x = x.item()
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        raise ValueError(f"`{name}` must be a finite number {rule}, got {x!r}")
    return float(x)


def nonneg_number(x: Any, name: str) -> float:
    value = _number(x, name, ">= 0")
    if value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {x!r}")
    return value


def positive_number(x: Any, name: str) -> float:
    value = _number(x, name, "> 0")
    if value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {x!r}")
    return value


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


def one_device(flat: Sequence[torch.Tensor], name: str) -> None:
    """All leaves of ``name`` on one device (a product mixes them; torch would raise deep)."""
    devices = {x.device for x in flat}
    if len(devices) > 1:
        raise TypeError(
            f"`{name}` has leaves on several devices {sorted(map(str, devices))}; move them to "
            "one device (hypergrad never moves tensors silently)"
        )


class Health:
    """Scalar health signals of one call, gathered on the device and read in one transfer.

    ``add(key, tensor)`` records a tensor of any shape (bools, ints and floats alike) without
    reading it; ``add_finite(key, leaves)`` records one ``isfinite(x).all()`` flag per leaf.
    ``read()`` stacks everything into one float vector and copies it to the host with a single
    ``.tolist()`` (one device synchronisation), after which ``self[key]`` is a Python float
    (or a list of floats for vectors). Reading the same signals one by one would cost one
    synchronisation each.
    """

    def __init__(self) -> None:
        self._keys: list[str] = []
        self._parts: list[torch.Tensor] = []
        self._values: dict[str, Any] = {}

    def add(self, key: str, value: torch.Tensor | float | bool | None) -> None:
        if value is None:
            return
        if not isinstance(value, torch.Tensor):
            self._values[key] = float(value)
            return
        self._keys.append(key)
        self._parts.append(value.detach())

    def add_finite(self, key: str, leaves: Sequence[torch.Tensor]) -> None:
        flags = [torch.isfinite(x).all() for x in leaves if isinstance(x, torch.Tensor)]
        if flags:
            self.add(key, torch.stack(flags) if len(flags) > 1 else flags[0].reshape(1))

    def read(self) -> dict[str, Any]:
        if not self._parts:
            return self._values
        device = self._parts[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        flat = torch.cat([p.reshape(-1).to(device=device, dtype=dtype) for p in self._parts])
        numbers = flat.tolist()
        i = 0
        for key, part in zip(self._keys, self._parts):
            n = part.numel()
            chunk = numbers[i : i + n]
            self._values[key] = chunk if part.dim() else chunk[0]
            i += n
        self._keys, self._parts = [], []
        return self._values

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def first_nonfinite(self, key: str) -> int | None:
        """Index of the first leaf recorded under ``key`` by ``add_finite`` that is not finite."""
        flags = self._values.get(key)
        if flags is None:
            return None
        for i, ok in enumerate(flags if isinstance(flags, list) else [flags]):
            if not ok:
                return i
        return None

    def raise_nonfinite(self, key: str, leaves: Sequence[torch.Tensor], what: str = "",
                        name: str | None = None) -> None:
        i = self.first_nonfinite(key)
        if i is not None:
            raise ValueError(nonfinite_message(name or key, i, leaves[i], what))


def captured_leaves(value: torch.Tensor, own: Sequence[torch.Tensor],
                    limit: int = 200_000) -> list[torch.Tensor]:
    """Leaf tensors that require grad, reached from ``value``'s autograd graph, not in ``own``.

    Walks ``grad_fn -> next_functions`` to the ``AccumulateGrad`` nodes (one per leaf that
    requires grad). A loss that closes over such a tensor (a module's own ``nn.Parameter``,
    say) treats it as a constant in every second-order product and passes it no
    hypergradient. Stops after ``limit`` nodes (returns what it found)."""
    fn = value.grad_fn
    if fn is None:
        return []
    own_ids = {id(x) for x in own}
    seen: set[int] = set()
    stack = [fn]
    found: list[torch.Tensor] = []
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            if id(variable) not in own_ids:
                found.append(variable)
            continue
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return found


_NO_DOUBLE_BACKWARD = ("derivative for", "not implemented")


@contextlib.contextmanager
def second_order(name: str) -> Iterator[None]:
    """Turn torch's "derivative for ... is not implemented" (an op with no double backward,
    e.g. the default CPU kernel of ``F.scaled_dot_product_attention``) into hypergrad's
    :class:`DoubleBackwardError` that names the way out (chained from torch's error)."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if all(s in text for s in _NO_DOUBLE_BACKWARD) or "double backward" in text:
            raise DoubleBackwardError(
                f"a second-order product of `{name}` needs a double backward that one of its "
                f"operations does not implement (torch: {text.splitlines()[0]}). Use "
                'products="finite_difference" (first-order gradients only), or switch that '
                "operation to a twice-differentiable kernel (e.g. for attention: "
                "torch.nn.attention.sdpa_kernel(SDPBackend.MATH))"
            ) from e
        raise
