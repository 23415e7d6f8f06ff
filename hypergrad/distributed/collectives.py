"""Collectives for data-parallel hypergradients: ``synced``, ``data_parallel``, ``shard``,
``all_gather``, process-group set-up and teardown (see the package docstring for the idea)."""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .. import tree
from ..tree import Tree

__all__ = ["init", "synced", "data_parallel", "is_main", "world_size", "rank", "shard",
           "all_reduce_sum", "all_gather", "barrier", "shutdown"]


def world_size() -> int:
    """The number of processes in the default group (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 outside torch.distributed)."""
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
    # a process that exits with the group alive can abort in gloo's teardown (SIGABRT,
    # "terminate called without an active exception"); destroy it while Python is alive
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed): e.g. after rank 0 wrote a file."""
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """End of a distributed run: wait for every rank, then destroy the process group (no-op
    when not distributed). Without the barrier a rank may tear down its connections while a
    peer still uses them; without the destroy, gloo can abort at interpreter exit."""
    if world_size() > 1:
        dist.barrier()
    _destroy()


def _flat_all_reduce(tensors: tuple[torch.Tensor, ...], mean: bool) -> list[torch.Tensor]:
    """One all-reduce (sum, or mean) for all tensors, flattened into one buffer: one message,
    not one per parameter tensor."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    if mean:
        flat = flat / dist.get_world_size()
    return [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class _AllReduce(torch.autograd.Function):
    """y_i = sum (or mean) over ranks of x_i. Both maps are self-adjoint, so the backward is
    the same all-reduce of the cotangents (differentiable any number of times)."""

    @staticmethod
    def forward(ctx, mean: bool, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.mean = mean
        return tuple(_flat_all_reduce(xs, mean))

    @staticmethod
    def backward(ctx, *gs: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return (None, *_AllReduce.apply(ctx.mean, *gs))  # None grads arrive as zeros


class _Synced(torch.autograd.Function):
    """Identity forward; the gradients are averaged over ranks (differentiably, in one
    all-reduce for the whole pytree)."""

    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *gs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return _AllReduce.apply(True, *gs)


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


def shard(batch: Any) -> Any:
    """This rank's contiguous equal share of a global batch along dim 0.

    ``batch`` is a tensor (e.g. the indices of a global batch) or a pytree of tensors that share
    their first dimension (non-tensor leaves are kept). Every rank must build the same global
    batch (seed it by the step index); the shard sizes are equal, so the mean of the shard means
    is the global mean. Identity when not distributed.
    """
    w, r = world_size(), rank()
    flat, spec = tree.flatten(batch)
    arrays = [type(x).__name__ for x in flat if hasattr(x, "__array__")
              and not isinstance(x, torch.Tensor)]
    if arrays:
        raise TypeError(f"`batch` holds {arrays[0]} leaves; convert them to tensors to shard them")
    leaves = [x for x in flat if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not leaves:
        raise TypeError(
            "`batch` must be a tensor with a batch dimension or a pytree holding such tensors, "
            f"got {type(batch).__name__}"
        )
    sizes = {int(x.shape[0]) for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"`batch` tensors must share their first dimension, got {sorted(sizes)}")
    size = sizes.pop()
    if size % w:
        raise ValueError(
            f"`batch` has {size} examples, not divisible by the world size {w}; use a "
            "global batch size that is a multiple of the number of processes"
        )
    if w == 1:
        return batch
    n = size // w
    flat = [x[r * n : (r + 1) * n] if isinstance(x, torch.Tensor) and x.dim() > 0 else x
            for x in flat]
    return tree.unflatten(flat, spec)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, differentiable to any order (the sum all-reduce is its own
    adjoint). Identity when not distributed."""
    if world_size() == 1:
        return x
    return _AllReduce.apply(False, x)[0]


class _AllGather(torch.autograd.Function):
    """Forward: concatenate every rank's ``x`` along dim 0. Backward: the cotangent of the
    concatenation summed over ranks (every rank's loss used every rank's rows), then this
    rank's rows; written with differentiable ops, so it composes with double backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.detach().contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_sum(g).narrow(0, dist.get_rank() * ctx.n, ctx.n)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (equal shapes) concatenated along dim 0 in rank order, differentiable
    to any order: for losses that couple examples (contrastive negatives), each rank scores its
    own rows against the gathered ones. Identity when not distributed."""
    if world_size() == 1:
        return x
    shape = torch.tensor([x.dim(), *x.shape, *[0] * (8 - x.dim())], device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)  # unequal shapes would fail (gloo) or hang (nccl) later
    if any(not torch.equal(t, shape) for t in shapes):
        got = [tuple(t[1 : 1 + int(t[0])].tolist()) for t in shapes]
        raise ValueError(f"all_gather needs equal shapes on every rank, got {got}")
    return _AllGather.apply(x)

