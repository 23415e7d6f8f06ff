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
identical across ranks with no broadcast. Losses that couple the examples of a batch need the
global batch too: :class:`SyncBatchNorm` (``convert_sync_batchnorm(module)``) for batch
statistics and :func:`all_gather` for contrastive negatives, both differentiable to any order.
This composes with torch.func-style functional parameters, where DDP's module hooks do not.
gloo (CPU) or nccl (GPU) is chosen by :func:`init` from the device.

Example (inside a torchrun worker):
    >>> import hypergrad as hg                                # doctest: +SKIP
    >>> hg.distributed.init()                                  # doctest: +SKIP
    >>> pt_loss = hg.distributed.data_parallel(my_pt_loss)     # doctest: +SKIP
    >>> trainer = hg.MetaPretrainer(pt_loss=pt_loss, ft_loss=hg.distributed.data_parallel(
    ...     my_ft_loss), ...)                                   # doctest: +SKIP
"""

from .collectives import (
    all_gather,
    all_reduce_sum,
    barrier,
    data_parallel,
    init,
    is_main,
    rank,
    shard,
    shutdown,
    synced,
    world_size,
)
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["init", "synced", "data_parallel", "is_main", "world_size", "rank", "shard",
           "all_reduce_sum", "all_gather", "SyncBatchNorm", "convert_sync_batchnorm", "barrier",
           "shutdown"]
