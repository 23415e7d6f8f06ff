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
import sys
import warnings
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
    finite_trees((t, name))


def finite_trees(*named: tuple[Any, str]) -> None:
    """:func:`finite` for several ``(tree, name)`` pairs with one host read in all; the first
    pair (in order) with a NaN/inf is named."""
    health = Health()
    flats = []
    for i, (t, _) in enumerate(named):
        flats.append([x for x in tree.leaves(t)
                      if isinstance(x, torch.Tensor) and x.is_floating_point()])
        health.add_finite(str(i), flats[-1])
    health.read()  # nothing to read (no host transfer) when no tree has a floating leaf
    for i, ((_, name), flat) in enumerate(zip(named, flats)):
        health.raise_nonfinite(str(i), flat, "; a hypergradient at non-finite values is "
                               "meaningless", name=name)


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


def finite_sum(x: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor that is finite if ``x`` is (NaN/inf propagate through a sum), real and
    floating: half precision summed in float32, complex as its real view, ints as 0."""
    if x.is_complex():
        x = torch.view_as_real(x)
    if not x.is_floating_point():
        return torch.zeros((), device=x.device)
    if x.element_size() < 4:
        return x.sum(dtype=torch.float32)
    return x.sum()


class Health:
    """Scalar health signals of one call, gathered on the device and read in one transfer.

    ``add(key, tensor)`` records a tensor of any shape (bools, ints and floats alike) without
    reading it; ``add_finite(key, leaves)`` records one finiteness flag per leaf. ``read()``
    stacks everything into one float vector and copies it to the host with a single
    ``.tolist()`` (one device synchronisation), after which ``self[key]`` is a Python float
    (or a list of floats for vectors; 1.0 / 0.0 for the flags of ``add_finite``). Reading the
    same signals one by one would cost one synchronisation each.

    A finiteness flag is the leaf's sum (NaN/inf anywhere makes it NaN/inf), one reduction
    instead of ``isfinite(x).all()``'s elementwise pass and reduction, which on a CPU costs
    ~40 sums. A finite leaf whose sum overflows would look non-finite, so a flag that fails is
    confirmed with ``isfinite(x).all()`` on the host before it is reported: exact, and an extra
    read only on the failure path. Half-precision leaves are summed in float32.

    Example:
        >>> import torch
        >>> h = Health()
        >>> h.add("residual", torch.tensor(0.5))
        >>> h.add_finite("x", [torch.ones(3), torch.tensor([1.0, float("nan")])])
        >>> h.add_finite("big", [torch.full((4,), 3e38, dtype=torch.float32)])  # sum: inf
        >>> h.read()["residual"], h["x"], h.first_nonfinite("x"), h.first_nonfinite("big")
        (0.5, [1.0, 0.0], 1, None)
    """

    def __init__(self) -> None:
        self._keys: list[str] = []
        self._parts: list[torch.Tensor] = []
        self._values: dict[str, Any] = {}
        # add_finite's leaves, kept to confirm a failed flag exactly (failure path only)
        self._finite: dict[str, list[torch.Tensor]] = {}

    def add(self, key: str, value: torch.Tensor | float | bool | None) -> None:
        if value is None:
            return
        if not isinstance(value, torch.Tensor):
            self._values[key] = float(value)
            return
        self._keys.append(key)
        self._parts.append(value.detach())

    def add_finite(self, key: str, leaves: Sequence[torch.Tensor]) -> None:
        xs = [x.detach() for x in leaves if isinstance(x, torch.Tensor)]
        if xs:
            sums = [finite_sum(x) for x in xs]
            self.add(key, torch.stack(sums) if len(sums) > 1 else sums[0].reshape(1))
            self._finite[key] = xs

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
            if key in self._finite:
                chunk = self._confirm(self._finite.pop(key), chunk)
            self._values[key] = chunk if part.dim() else chunk[0]
            i += n
        self._keys, self._parts = [], []
        return self._values

    @staticmethod
    def _confirm(leaves: list[torch.Tensor], sums: list[float]) -> list[float]:
        """1.0 / 0.0 per leaf from its sum; a non-finite sum is confirmed by
        ``isfinite(x).all()`` (a finite leaf may overflow its sum): the failure path only."""
        out = []
        for x, s in zip(leaves, sums):
            ok = math.isfinite(s) or bool(torch.isfinite(x).all())
            out.append(1.0 if ok else 0.0)
        return out

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


def captured_leaves(values: torch.Tensor | Sequence[Any], own: Sequence[torch.Tensor],
                    limit: int = 200_000) -> list[torch.Tensor]:
    """Leaf tensors that require grad, reached from the autograd graph of ``values`` (a tensor
    or a sequence of them; other entries are skipped), not in ``own``.

    Walks ``grad_fn -> next_functions`` to the ``AccumulateGrad`` nodes (one per leaf that
    requires grad). A loss or map that closes over such a tensor (a module's own
    ``nn.Parameter``, say) treats it as a constant in every product and passes it no
    hypergradient. Stops after ``limit`` nodes (returns what it found)."""
    roots = [values] if isinstance(values, torch.Tensor) else list(values)
    own_ids = {id(x) for x in own}
    # the nodes themselves, not their ids: a visited node stays alive, so no id is reused
    seen: set[torch.autograd.graph.Node] = set()
    stack = [v.grad_fn for v in roots if isinstance(v, torch.Tensor) and v.grad_fn is not None]
    found: list[torch.Tensor] = []
    while stack and len(seen) < limit:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            if id(variable) not in own_ids:
                found.append(variable)
            continue
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return found


# --- the failure policy of every hypergradient (``on_failure=``) ---------------------------------
POLICIES = ("warn", "raise", "ignore")


def policy(on_failure: Any) -> None:
    """``on_failure`` must be one of :data:`POLICIES`."""
    if not isinstance(on_failure, str) or on_failure not in POLICIES:
        raise ValueError(f"`on_failure` must be one of {POLICIES}, got {on_failure!r}")


PRODUCTS = ("exact", "finite_difference")


def products(products: Any, fd_eps: Any) -> None:
    """``products`` must be one of :data:`PRODUCTS`; ``fd_eps`` a positive step that comes
    with finite-difference products only."""
    if not isinstance(products, str) or products not in PRODUCTS:
        raise ValueError(f"`products` must be one of {PRODUCTS}, got {products!r}")
    if fd_eps is not None:
        positive_number(fd_eps, "fd_eps")
        if products != "finite_difference":
            raise ValueError(
                '`fd_eps` is the step of finite-difference products: pass it with '
                f'products="finite_difference" (got products={products!r}), or drop it'
            )


def report_failure(reasons: Sequence[str], on_failure: str, stacklevel: int) -> None:
    """Why a hypergradient may be wrong, by the policy: ``"warn"`` once per reason (each a
    fixed message, so Python's default filter shows a repeated reason once per call site; a
    joined message would repeat for every combination), ``"raise"`` one
    :class:`HypergradientError` with all of them, ``"ignore"`` nothing. ``stacklevel`` is
    ``warnings.warn``'s, counted from this function."""
    if not reasons or on_failure == "ignore":
        return
    if on_failure == "raise":
        raise HypergradientError("hypergradient may be wrong: " + "; ".join(reasons))
    for reason in reasons:
        warnings.warn("hypergradient may be wrong: " + reason, HypergradientWarning,
                      stacklevel=stacklevel)


_NO_DOUBLE_BACKWARD = ("derivative for", "not implemented")
# torch.compile (AOTAutograd) and @once_differentiable functions refuse a second backward
_REFUSED = ("double backward", "differentiate twice")
# the module every AOTAutograd compilation goes through (torch.func imports only its helpers)
_AOT_ENTRY = "torch._functorch.aot_autograd"


# the first-order way out, for reverse-mode IFT products (the default) and the others
FD_FIX = ('Use products="finite_difference" (first-order gradients only; hg.fd_hvp, '
          "hg.fd_mixed_vjp, hg.FiniteDifferenceOperator for single products)")
FORWARD_FIX = ("Forward-mode and unrolled derivatives have no first-order variant: for a "
               'hypergradient use hg.implicit_grad(..., products="finite_difference") '
               "(first-order gradients only)")


def _way_out(name: str, cause: str, fix: str) -> str:
    return (f"a second-order product of `{name}` needs a double backward that {cause}. {fix}, "
            "or make that part twice differentiable (e.g. for attention: "
            "torch.nn.attention.sdpa_kernel(SDPBackend.MATH); for torch.compile: keep the "
            "loss eager)")


@contextlib.contextmanager
def second_order(name: str, fix: str = FD_FIX) -> Iterator[None]:
    """Turn torch's "derivative for ... is not implemented" (an op with no double backward,
    e.g. the default CPU kernel of ``F.scaled_dot_product_attention``), AOTAutograd's "does not
    currently support double backward" and ``@once_differentiable``'s "differentiate twice"
    into hypergrad's :class:`DoubleBackwardError` that names the way out, ``fix`` (chained from
    torch's error)."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if all(s in text for s in _NO_DOUBLE_BACKWARD) or any(s in text for s in _REFUSED):
            raise DoubleBackwardError(_way_out(
                name, f"one of its operations does not implement (torch: {text.splitlines()[0]})",
                fix)) from e
        raise


def _compiled_double_backward(node: Any) -> bool:
    """Whether ``node`` is the backward of AOTAutograd's compiled backward (the node a
    ``torch.compile``-d region leaves in a gradient built with ``create_graph=True``)."""
    cls = getattr(node, "_forward_cls", None)
    if cls is None:
        return False
    name = getattr(cls, "__name__", "")
    return name == "CompiledFunctionBackward" or (hasattr(cls, "_aot_id")
                                                   and name.endswith("Backward"))


def _once_differentiable_code() -> Any:
    """The code object every ``@once_differentiable`` backward shares (torch's wrapper)."""
    from torch.autograd.function import once_differentiable

    return once_differentiable(lambda ctx, *args: None).__code__


_ONCE = _once_differentiable_code()


def _is_once_differentiable(node: Any) -> bool:
    cls = getattr(node, "_forward_cls", None)
    return getattr(getattr(cls, "backward", None), "__code__", None) is _ONCE


def _graph_nodes(roots: Sequence[Any], seen: set[Any], limit: int) -> Iterator[Any]:
    """The autograd nodes reachable from ``roots``, each once, depth first, until ``seen``
    (the nodes already visited, updated in place) holds ``limit`` of them."""
    stack = list(roots)
    while stack and len(seen) < limit:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)


def check_once_differentiable(value: torch.Tensor, params: Sequence[torch.Tensor], name: str,
                              fix: str = FD_FIX, limit: int = 200_000) -> None:
    """Raise :class:`DoubleBackwardError` if the graph of the loss ``value`` has an
    ``@once_differentiable`` function on a path to ``params``.

    Its backward runs under ``no_grad``; torch links its output to an error node only when
    the incoming gradient requires grad, so where it does not (the function applied last, or
    scaled by constants) the first-order gradient silently loses its dependence on everything
    behind the function and exact second-order products read as zeros there. One walk of the
    loss graph (a microsecond or so per node); a second one, to see whether such a function
    reaches ``params``, only when one was found."""
    if value.grad_fn is None:
        return
    found = [node for node in _graph_nodes([value.grad_fn], set(), limit)
             if _is_once_differentiable(node)]
    if not found:
        return
    targets = {id(x) for x in params}
    reach: dict[Any, bool] = {}
    todo: list[tuple[Any, bool]] = [(value.grad_fn, False)]
    while todo:  # post-order: whether each node reaches a leaf of params
        node, done = todo.pop()
        if done:
            variable = getattr(node, "variable", None)
            reach[node] = (isinstance(variable, torch.Tensor) and id(variable) in targets) or any(
                reach.get(nxt, False) for nxt, _ in node.next_functions if nxt is not None)
            continue
        if node in reach:
            continue
        todo.append((node, True))
        todo.extend((nxt, False) for nxt, _ in node.next_functions
                    if nxt is not None and nxt not in reach)
    bad = [node for node in found if reach.get(node)]
    if bad:
        raise DoubleBackwardError(_way_out(
            name, f"{bad[0].name()}, an @once_differentiable function on the path to "
            "`params`, does not have (torch would silently drop its second derivatives, "
            "reading as zeros)", fix))


def check_double_backward(grads: Sequence[torch.Tensor | None], name: str,
                          stop: Sequence[torch.Tensor] = (), fix: str = FD_FIX,
                          limit: int = 200_000) -> None:
    """Raise :class:`DoubleBackwardError` if the graph of the first-order gradients ``grads``
    (built with ``create_graph=True``) runs through a ``torch.compile``-d region.

    AOTAutograd gives a compiled region a first-order backward only. Differentiating a gradient
    through it raises when the region's node is linked to what is differentiated, but that node
    is linked only to the tensors the region saved, not to its inputs: a derivative with
    respect to anything else (the hyperparameters of a mixed product, often the parameters too)
    reaches no node, and torch returns no gradient, read as zero. So the graph is searched, not
    the result (a gradient that genuinely does not depend on an input is zero, correctly).
    ``stop``: tensors whose history is not searched (the inputs of one step of an unroll).
    Free until something has been compiled through AOTAutograd in this process (torch.compile's
    default backends, ``aot_function``): its entry module is imported then, and only then is
    the graph searched (a Python walk, about a microsecond per node)."""
    if _AOT_ENTRY not in sys.modules:
        return  # nothing can have been compiled through AOTAutograd
    seen: set[torch.autograd.graph.Node] = {x.grad_fn for x in stop
                                            if isinstance(x, torch.Tensor) and x.grad_fn}
    roots = [g.grad_fn for g in grads if isinstance(g, torch.Tensor) and g.grad_fn is not None]
    for node in _graph_nodes(roots, seen, limit):
        if _compiled_double_backward(node):
            raise DoubleBackwardError(_way_out(
                name, "torch does not implement through a torch.compile-d region (AOTAutograd "
                "compiles a first-order backward only: exact products through it would raise "
                "or silently miss every term through the region, reading as zeros)", fix))
