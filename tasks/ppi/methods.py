"""The PT methods compared in Raghu et al. 2021, Table 1, all on the same GIN encoder.

* ``no_pt``: no pre-training (FT from random init).
* ``graph_sup_pt``: PT on all PT tasks with uniform weights (``MetaPretrainer(meta=False)``, so
  its PT steps are the very steps Meta-PT takes when phi is frozen).
* ``cotrain``, ``cotrain_pcgrad``, ``ift_cotrain``: the CoTrain baselines (cotrain.py).
* ``meta_pt``: L_PT = (1/T) sum_i 2 sigmoid(phi_i) BCE_i, phi learned online by
  ``hg.MetaPretrainer`` (P PT steps, then K head-only FT steps on D_FT(Meta)-train and the
  hypergradient of the D_FT(Meta)-val loss; IFT with a Neumann series whose step is the PT lr).

Every PT method returns the encoder's parameters; the FT protocol (finetune.py) is shared.
BatchNorm: PT losses use batch statistics and never write running statistics (Hessian
products must not change state); FT recalibrates them on the FT inputs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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

__all__ = ["PTResult", "pretrain", "PT_METHODS"]

PT_METHODS = ("no_pt", "graph_sup_pt", "cotrain", "cotrain_pcgrad", "meta_pt", "ift_cotrain")
Params = dict[str, torch.Tensor]


@dataclass
class PTResult:
    """Encoder parameters after PT (``None`` for no_pt), learned task weights, diagnostics."""

    encoder: Params | None
    weights: list[float] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class _Net:
    """Encoder template (for functional_call), its fixed BN buffers, and initial parameters."""

    def __init__(self, s: Settings, n_pt: int, n_ft: int, seed: int, sync_bn: bool = False
                 ) -> None:
        torch.manual_seed(seed)
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


def _encoder_only(params: Params) -> Params:
    return {k: v for k, v in params.items() if k.startswith("enc.")}


def _strip(params: Params) -> Params:
    return {k[4:]: v.detach().clone() for k, v in params.items() if k.startswith("enc.")}


def _bce_tasks(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-task BCE averaged over the batch, shape [T]."""
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)


def _stream(idx: torch.Tensor, bs: int, seed: int) -> Callable[[int], torch.Tensor]:
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


def _weighted_pt_loss(net: _Net) -> Callable[[Params, Params, GraphBatch], torch.Tensor]:
    def pt_loss(p: Params, h: Params, b: GraphBatch) -> torch.Tensor:
        logits = F.linear(net.encode(p, b), p["pt_head.weight"], p["pt_head.bias"])
        return (2 * torch.sigmoid(h["logit"]) * _bce_tasks(logits, b.y_pt)).mean()

    return pt_loss


Loss3 = Callable[[Params, Params, GraphBatch], torch.Tensor]


def _ft_loss(net: _Net, tasks: torch.Tensor) -> Loss3:
    def ft_loss(e: Params, hd: Params, b: GraphBatch) -> torch.Tensor:
        logits = F.linear(net.encode(e, b), hd["weight"], hd["bias"])
        return F.binary_cross_entropy_with_logits(logits, b.y_ft[:, tasks])

    return ft_loss


def _build_trainer(
    problem: Problem, s: Settings, seed: int, fold: int | None, meta: bool,
    init_logit: torch.Tensor | None = None,
) -> tuple[hg.MetaPretrainer, Callable[[int], GraphBatch], Callable[[int], Any]]:
    """The MetaPretrainer of Graph Sup PT (meta=False) / Meta-PT and its batch functions."""
    store = problem.store
    tasks = problem.meta_tasks(fold)
    net = _Net(s, store.num_pt_tasks, len(tasks), seed, sync_bn=hd.world_size() > 1)
    pt_stream = _stream(problem.split.pretrain, s.batch_size, seed)
    mbs = s.meta_batch_size or s.batch_size
    mtr = _stream(problem.meta_train, mbs, seed + 1)
    mva = _stream(problem.meta_val, mbs, seed + 2)
    # data parallel under torchrun (identity otherwise): each rank takes its 1/N of every batch
    trainer = hg.MetaPretrainer(
        pt_loss=hd.data_parallel(_weighted_pt_loss(net)),
        ft_loss=hd.data_parallel(_ft_loss(net, tasks)),
        pt_params=net.params,
        ft_head=net.ft_head,
        hparams={"logit": torch.zeros(store.num_pt_tasks) if init_logit is None else init_logit},
        encoder=_encoder_only,
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


def _meta_pretrain(
    problem: Problem, s: Settings, seed: int, fold: int | None, meta: bool,
    ckpt: Path | None, progress: bool, init_logit: torch.Tensor | None = None,
) -> PTResult:
    """Graph Sup PT (meta=False) or Meta-PT (meta=True) through ``hg.MetaPretrainer``."""
    trainer, pt_batch, ft_batch = _build_trainer(problem, s, seed, fold, meta, init_logit)
    hist = trainer.run(s.meta_steps, pt_batch, ft_batch, checkpoint=ckpt,
                       checkpoint_every=max(1, s.meta_steps // 20), progress=progress)
    weights = (2 * torch.sigmoid(trainer.hparams["logit"].detach())).tolist()
    pt_time = float(np.sum([h["pt_time"] for h in hist]))
    meta_time = float(np.sum([h["meta_time"] for h in hist]))
    info = {
        "pt_step_time": pt_time / max(1, trainer.pt_steps_done),
        "meta_step_time": meta_time / max(1, trainer.meta_steps_done) if meta else 0.0,
        "total_time": pt_time + meta_time,
        "final_pt_loss": hist[-1]["pt_loss"] if hist else float("nan"),
        "val_loss": [h.get("val_loss") for h in hist][-10:] if meta else None,
    }
    return PTResult(_strip(trainer.pt_params), weights if meta else None, info)


def time_meta_vs_plain(problem: Problem, s: Settings, outer: int = 20, rounds: int = 3,
                       seed: int = 0) -> dict[str, float]:
    """CPU time per PT step and per meta step: ``MetaPretrainer(meta=False)`` vs ``meta=True``
    on the same problem, interleaved in ``rounds`` chunks of ``outer`` outer iterations (CPU
    process time, robust to other processes on a shared machine; wall time also reported)."""
    plain, pb, fb = _build_trainer(problem, s, seed, None, meta=False)
    meta, mpb, mfb = _build_trainer(problem, s, seed, None, meta=True)
    cpu = {"plain": 0.0, "meta": 0.0}
    wall = {"plain": 0.0, "meta": 0.0}
    plain.run(1, pb, fb, progress=False)  # warm-up
    meta.run(1, mpb, mfb, progress=False)
    for r in range(1, rounds + 1):
        for name, (tr, p_fn, f_fn) in (("plain", (plain, pb, fb)), ("meta", (meta, mpb, mfb))):
            c0, w0 = time.process_time(), time.perf_counter()
            tr.run(1 + r * outer, p_fn, f_fn, progress=False)
            cpu[name] += time.process_time() - c0
            wall[name] += time.perf_counter() - w0
    n_outer = rounds * outer
    pt_step = cpu["plain"] / (n_outer * s.P)
    return {
        "pt_step_cpu_s": pt_step,
        "meta_step_cpu_s": (cpu["meta"] - cpu["plain"]) / n_outer,
        "meta_step_over_pt_step": (cpu["meta"] - cpu["plain"]) / n_outer / pt_step,
        "meta_pt_over_plain_pt": cpu["meta"] / cpu["plain"],
        "meta_pt_over_plain_pt_wall": wall["meta"] / wall["plain"],
        "outer_iterations": n_outer,
        "P": s.P,
    }


def pretrain(
    method: str,
    problem: Problem,
    s: Settings,
    seed: int,
    fold: int | None = None,
    ckpt: str | Path | None = None,
    progress: bool = True,
) -> PTResult:
    """Run the PT stage of ``method``; ``fold`` selects the partial-access held-out tasks."""
    if method not in PT_METHODS:
        raise ValueError(f"`method` must be one of {PT_METHODS}, got {method!r}")
    ckpt = Path(ckpt) if ckpt is not None else None
    if method == "no_pt":
        return PTResult(None)
    if method in ("graph_sup_pt", "meta_pt"):
        return _meta_pretrain(problem, s, seed, fold, method == "meta_pt", ckpt, progress)
    from .cotrain import cotrain

    variant = {"cotrain": "plain", "cotrain_pcgrad": "pcgrad", "ift_cotrain": "ift"}[method]
    return cotrain(problem, s, seed, fold, variant, ckpt, progress)
