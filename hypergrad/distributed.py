"""Data-parallel hypergradients on torch.distributed (run under ``torchrun``).

One idea: a loss evaluated on this rank's shard, whose inputs pass through :func:`synced`, has
the gradient of the mean loss over all ranks. ``synced(x)`` is the identity in the forward pass
and an all-reduce-mean in the backward pass, and that backward is itself differentiable (the
mean all-reduce is its own adjoint), so second-order products are data-parallel too:

    grad_p  L(synced(p))          = mean_r grad L_r(p)                 (PT step, FT step)
    H v     through the same graph = mean_r H_r v                      (every solver matvec)
    mixed   through synced(hparams) = mean_r (d2 L_r / dp dh)^T v       (IFT mixed product)

With equal shard sizes and mean-reduced losses, every rank therefore computes exactly the
single-process quantities on the union of the shards, solvers take the same branches on every
rank (they only branch on all-reduced numbers), and parameters and meta-parameters stay
identical across ranks with no broadcast. This composes with torch.func-style functional
parameters, where DDP's module hooks do not. gloo (CPU) or nccl (GPU) is chosen by
:func:`init` from the device.

Example (inside a torchrun worker):
    >>> import hypergrad as hg                                # doctest: +SKIP
    >>> hg.distributed.init()                                  # doctest: +SKIP
    >>> pt_loss = hg.distributed.data_parallel(my_pt_loss)     # doctest: +SKIP
    >>> trainer = hg.MetaPretrainer(pt_loss=pt_loss, ft_loss=hg.distributed.data_parallel(
    ...     my_ft_loss), ...)                                   # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from . import tree
from .tree import Tree

__all__ = ["init", "synced", "data_parallel", "is_main", "world_size", "rank", "shard"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 or when not distributed: log, plot and checkpoint only there."""
    return rank() == 0


def init(backend: str | None = None, timeout_s: float = 120.0) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    Returns False (and does nothing) outside torchrun (no ``WORLD_SIZE``). ``backend`` defaults
    to nccl when CUDA is available, else gloo. ``timeout_s`` bounds every collective: a rank
    that died makes the others fail with an error after it instead of hanging forever.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _flat_all_reduce_mean(tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """One all-reduce for all tensors (flattened into one buffer): one message, not one per
    parameter tensor."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class _AllReduceMean(torch.autograd.Function):
    """y_i = mean over ranks of x_i; self-adjoint, so its backward is itself (differentiable
    any number of times)."""

    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return tuple(_flat_all_reduce_mean(xs))

    @staticmethod
    def backward(ctx, *gs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return _AllReduceMean.apply(*gs)  # None grads arrive materialised as zeros


class _Synced(torch.autograd.Function):
    """Identity forward; the gradients are averaged over ranks (differentiably, in one
    all-reduce for the whole pytree)."""

    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *gs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return _AllReduceMean.apply(*gs)


def synced(t: Tree) -> Tree:
    """``t`` unchanged, with gradients averaged over ranks (identity when not distributed)."""
    if world_size() == 1:
        return t
    flat, spec = tree.flatten(t)
    idx = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not idx:
        return t
    outs = _Synced.apply(*[flat[i] for i in idx])
    for i, o in zip(idx, outs):
        flat[i] = o
    return tree.unflatten(flat, spec)


def data_parallel(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap ``loss(a, b, *rest)`` so its first two arguments (params and hparams, or encoder and
    head) are :func:`synced`: its gradients and second-order products are those of the mean
    loss over ranks. Each rank passes its own shard in ``rest`` (the batch)."""

    def wrapped(a: Tree, b: Tree, *rest: Any) -> torch.Tensor:
        return loss(synced(a), synced(b), *rest)

    wrapped.__wrapped__ = loss  # type: ignore[attr-defined]
    return wrapped


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous equal share of a global batch of indices (the length must be
    divisible by the world size, so that the mean of shard means is the global mean)."""
    w, r = world_size(), rank()
    if len(indices) % w:
        raise ValueError(
            f"`indices` has length {len(indices)}, not divisible by the world size {w}; use a "
            "global batch size that is a multiple of the number of processes"
        )
    n = len(indices) // w
    return indices[r * n : (r + 1) * n]
