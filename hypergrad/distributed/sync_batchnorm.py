"""Differentiable synchronised batch norm: the batch statistics of the global batch.

Part of :mod:`hypergrad.distributed` (re-exported there); see that module for the idea.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from .collectives import all_reduce_sum, world_size

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all ranks), computed
    with differentiable all-reduces, so Hessian-vector and mixed products through it are those
    of the single-process model on the union of the shards (``torch.nn.SyncBatchNorm`` has a
    first-order-only backward). Input ``[N, C, *]``; plain batch norm when not distributed or in
    eval mode. Statistics are computed in at least float32, like torch's BatchNorm.

        mean = sum_r sum_i x_ri / N,  var = sum_r sum_i (x_ri - mean)^2 / N   (N: global count)

    Example (one process: plain batch norm):
        >>> import torch, hypergrad as hg
        >>> hg.distributed.SyncBatchNorm(3)(torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects input [N, C, *], got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not (self.training and world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        local_n = x.numel() // x.shape[1]
        if xs.dtype == torch.float64 or local_n * world_size() <= 2**24:
            # one all-reduce for the sums and the (exactly representable) count
            tot = all_reduce_sum(torch.cat([xs.sum(dims), xs.new_full((1,), local_n)]))
            n, sums = int(tot[-1].detach()), tot[:-1]
        else:
            count = torch.tensor([local_n], dtype=torch.int64, device=x.device)
            dist.all_reduce(count)
            n, sums = int(count), all_reduce_sum(xs.sum(dims))
        if n <= 1:
            raise ValueError(
                f"SyncBatchNorm needs more than 1 value per channel in the global batch, got "
                f"input {tuple(x.shape)} on each of {world_size()} ranks"
            )
        mean = sums / n
        xc = xs - mean.view(shape)
        var = all_reduce_sum((xc * xc).sum(dims)) / n
        rm, rv, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        if self.track_running_stats and rm is not None:
            # _NormBase registers all three buffers together (or all three as None)
            assert rv is not None and tracked is not None
            with torch.no_grad():
                tracked.add_(1)
                m = 1.0 / float(tracked) if self.momentum is None else self.momentum
                rm.mul_(1 - m).add_(mean.detach().to(rm.dtype), alpha=m)
                rv.mul_(1 - m).add_((var.detach() * n / (n - 1)).to(rv.dtype), alpha=m)
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


_PLAIN_BN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _to_sync(bn: _BatchNorm) -> SyncBatchNorm:
    ref = next(iter(bn.state_dict().values()), None)  # keep dtype and device
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                        bn.track_running_stats, **kw)
    new.load_state_dict(bn.state_dict())
    if bn.affine:
        new.weight.requires_grad_(bn.weight.requires_grad)
        new.bias.requires_grad_(bn.bias.requires_grad)
    return new.train(bn.training)


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Every ``BatchNorm1d/2d/3d`` in ``module`` (``module`` itself included) replaced in place by
    :class:`SyncBatchNorm` with the same parameters, buffers and ``requires_grad``; returns the
    module (a new one if ``module`` was itself a BatchNorm). Names are unchanged, so
    ``functional_call`` dictionaries keep working. Other BatchNorm classes (subclasses,
    ``torch.nn.SyncBatchNorm``) raise a TypeError rather than keep per-shard statistics."""
    if type(module) in _PLAIN_BN:
        return _to_sync(module)  # type: ignore[arg-type]
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        raise TypeError(
            f"convert_sync_batchnorm cannot convert {type(module).__name__} (not a plain "
            "BatchNorm1d/2d/3d; torch.nn.SyncBatchNorm is first-order only); replace it by "
            "hypergrad.distributed.SyncBatchNorm yourself"
        )
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module
