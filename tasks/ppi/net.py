"""What the PPI PT methods share: the GIN encoder template, the weighted PT loss and the FT
loss, batch streams, the task-weight optimizer, and the MetaPretrainer of Graph Sup PT / Meta-PT
(``build_trainer``; also used by studies/distributed_scaling.py).

BatchNorm: PT losses use batch statistics and never write running statistics (Hessian
products must not change state); FT recalibrates them on the FT inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hypergrad as hg
from hypergrad import distributed as hd
from models.gin import GINEncoder

from .config import Settings
from .data import GraphBatch
from .finetune import Problem

__all__ = ["PTResult", "Net", "Params", "Loss3", "build_trainer", "meta_optimizer", "stream",
           "weighted_pt_loss", "ft_loss_fn", "strip_encoder", "encoder_only", "NormalizedSGD"]

Params = dict[str, torch.Tensor]
Loss3 = Callable[[Params, Params, GraphBatch], torch.Tensor]


@dataclass
class PTResult:
    """Encoder parameters after PT (``None`` for no_pt), learned task weights, diagnostics."""

    encoder: Params | None
    weights: list[float] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Net:
    """Encoder template (for functional_call), its fixed BN buffers, and initial parameters."""

    def __init__(self, s: Settings, n_pt: int, n_ft: int, seed: int, sync_bn: bool = False,
                 device: torch.device | str = "cpu") -> None:
        torch.manual_seed(seed)  # initialised on the CPU (the same numbers anywhere), then moved
        self.enc = GINEncoder(s.gin).train()
        if sync_bn:  # data parallel: statistics of the global batch (same parameter names)
            hd.convert_sync_batchnorm(self.enc)
        self.buffers = {k: v.detach().clone() for k, v in self.enc.named_buffers()}
        pt_head, ft_head = nn.Linear(s.gin.repr_dim, n_pt), nn.Linear(s.gin.repr_dim, n_ft)
        self.params: Params = {f"enc.{k}": v.detach().clone() for k, v in
                               self.enc.named_parameters()}
        self.params.update({f"pt_head.{k}": v.detach().clone() for k, v in
                            pt_head.named_parameters()})
        self.ft_head: Params = {k: v.detach().clone() for k, v in ft_head.named_parameters()}
        self.enc.to(device)
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        self.params = {k: v.to(device) for k, v in self.params.items()}
        self.ft_head = {k: v.to(device) for k, v in self.ft_head.items()}

    def encode(self, params: Params, batch: GraphBatch) -> torch.Tensor:
        """Graph representations; BatchNorm in train mode on cloned (discarded) buffers."""
        enc = {k[4:]: v for k, v in params.items() if k.startswith("enc.")}
        bufs = {k: v.clone() for k, v in self.buffers.items()}
        return functional_call(self.enc, (enc, bufs), batch.inputs())


class NormalizedSGD(torch.optim.Optimizer):
    """SGD on the gradient divided by its root-mean-square over all entries of the group:
    step sizes independent of the (tiny, alpha-scaled) hypergradient scale, while the relative
    sizes across task weights are kept (Adam would equalise them per coordinate)."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            sq = sum(float((p.grad**2).sum()) for p in ps)
            rms = (sq / sum(p.numel() for p in ps)) ** 0.5
            if rms > 0:
                for p in ps:
                    p.add_(p.grad, alpha=-group["lr"] / rms)


def meta_optimizer(s: Settings) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    """Factory for the optimizer of the task-weight logits phi (``s.meta_optimizer``)."""
    if s.meta_optimizer == "adam":
        return lambda ts: torch.optim.Adam(ts, lr=s.meta_lr, eps=1e-12)
    if s.meta_optimizer == "nsgd":
        return lambda ts: NormalizedSGD(ts, lr=s.meta_lr)
    if s.meta_optimizer == "sgd":
        return lambda ts: torch.optim.SGD(ts, lr=s.meta_lr)
    raise ValueError(
        f"`meta_optimizer` must be 'adam', 'nsgd' or 'sgd', got {s.meta_optimizer!r}"
    )


def encoder_only(params: Params) -> Params:
    return {k: v for k, v in params.items() if k.startswith("enc.")}


def strip_encoder(params: Params) -> Params:
    return {k[4:]: v.detach().clone() for k, v in params.items() if k.startswith("enc.")}


def bce_tasks(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-task BCE averaged over the batch, shape [T]."""
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)


def stream(idx: torch.Tensor, bs: int, seed: int) -> Callable[[int], torch.Tensor]:
    """Batch i of an epoch-wise reshuffled stream over ``idx``: a pure function of i."""
    n = idx.numel()
    per_epoch = max(1, n // bs)

    @functools.lru_cache(maxsize=4)
    def perm(epoch: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))

    def get(i: int) -> torch.Tensor:
        epoch, k = divmod(i, per_epoch)
        return idx[perm(epoch)[k * bs: (k + 1) * bs]] if n >= bs else idx[perm(epoch)]

    return get


def weighted_pt_loss(net: Net) -> Callable[[Params, Params, GraphBatch], torch.Tensor]:
    def pt_loss(p: Params, h: Params, b: GraphBatch) -> torch.Tensor:
        logits = F.linear(net.encode(p, b), p["pt_head.weight"], p["pt_head.bias"])
        return (2 * torch.sigmoid(h["logit"]) * bce_tasks(logits, b.y_pt)).mean()

    return pt_loss



def ft_loss_fn(net: Net, tasks: torch.Tensor) -> Loss3:
    def ft_loss(e: Params, hd: Params, b: GraphBatch) -> torch.Tensor:
        logits = F.linear(net.encode(e, b), hd["weight"], hd["bias"])
        return F.binary_cross_entropy_with_logits(logits, b.y_ft[:, tasks])

    return ft_loss


def build_trainer(
    problem: Problem, s: Settings, seed: int, fold: int | None, meta: bool,
    init_logit: torch.Tensor | None = None,
) -> tuple[hg.MetaPretrainer, Callable[[int], GraphBatch], Callable[[int], Any]]:
    """The MetaPretrainer of Graph Sup PT (meta=False) / Meta-PT and its batch functions."""
    store = problem.store
    tasks = problem.meta_tasks(fold)
    net = Net(s, store.num_pt_tasks, len(tasks), seed, sync_bn=hd.world_size() > 1,
              device=store.device)
    tasks = tasks.to(store.device)
    pt_stream = stream(problem.split.pretrain, s.batch_size, seed)
    mbs = s.meta_batch_size or s.batch_size
    mtr = stream(problem.meta_train, mbs, seed + 1)
    mva = stream(problem.meta_val, mbs, seed + 2)
    # data parallel under torchrun (identity otherwise): each rank takes its 1/N of every batch
    trainer = hg.MetaPretrainer(
        pt_loss=hd.data_parallel(weighted_pt_loss(net)),
        ft_loss=hd.data_parallel(ft_loss_fn(net, tasks)),
        pt_params=net.params,
        ft_head=net.ft_head,
        hparams={"logit": torch.zeros(store.num_pt_tasks, device=store.device)
                 if init_logit is None else init_logit.to(store.device)},
        encoder=encoder_only,
        pt_optimizer=lambda ts: torch.optim.Adam(ts, lr=s.pt_lr),
        meta_optimizer=meta_optimizer(s),
        P=s.P, K=s.K, ft_lr=s.ft_unroll_lr, head_only=True,
        # one Neumann term with the PT lr as step (the authors' choice); MetaPretrainer warns
        # once when negative PT curvature puts the residual slightly above 1
        solver=functools.partial(hg.neumann, iterations=s.neumann_terms, alpha=s.pt_lr),
        meta=meta,
    )
    return (trainer, lambda i: store.batch(hd.shard(pt_stream(i))),
            lambda j: (store.batch(hd.shard(mtr(j))), store.batch(hd.shard(mva(j)))))
