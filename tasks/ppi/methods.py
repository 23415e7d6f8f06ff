"""The PT methods compared in Raghu et al. 2021, Table 1, all on the same GIN encoder.

* ``no_pt``: no pre-training (FT from random init).
* ``graph_sup_pt``: PT on all PT tasks with uniform weights (``MetaPretrainer(meta=False)``, so
  its PT steps are the very steps Meta-PT takes when phi is frozen).
* ``cotrain``: one network with PT and FT heads, alternating PT and D_FT(Meta) batches.
* ``cotrain_pcgrad``: per step one PT and one FT batch; where their encoder gradients conflict
  each is projected on the normal plane of the other (PCGrad, Yu et al. 2020).
* ``meta_pt``: L_PT = (1/T) sum_i 2 sigmoid(phi_i) BCE_i, phi learned online by
  ``hg.MetaPretrainer`` (P PT steps, then K head-only FT steps on D_FT(Meta)-train and the
  hypergradient of the D_FT(Meta)-val loss; IFT with a Neumann series whose step is the PT lr).
* ``ift_cotrain`` (the appendix' extra row): CoTrain whose PT task weights are tuned by
  single-stage IFT hyperparameter optimisation (``hg.implicit_grad``, Lorraine et al. 2020).

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
from tasks.common import atomic_save

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

    def __init__(self, s: Settings, n_pt: int, n_ft: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.enc = GINEncoder(s.gin).train()
        if hd.world_size() > 1:  # batch statistics of the global batch (same parameter names)
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
    net = _Net(s, store.num_pt_tasks, len(tasks), seed)
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


def _pcgrad(g1: list[torch.Tensor], g2: list[torch.Tensor]) -> list[torch.Tensor]:
    """PCGrad for two tasks: remove from each gradient its component along the other when
    they conflict (negative inner product), then sum."""
    dot = sum((a * b).sum() for a, b in zip(g1, g2))
    if dot >= 0:
        return [a + b for a, b in zip(g1, g2)]
    n1 = sum((a * a).sum() for a in g1).clamp_min(1e-20)
    n2 = sum((b * b).sum() for b in g2).clamp_min(1e-20)
    return [(a - dot / n2 * b) + (b - dot / n1 * a) for a, b in zip(g1, g2)]


def _cotrain(
    problem: Problem, s: Settings, seed: int, fold: int | None, variant: str,
    ckpt: Path | None, progress: bool,
) -> PTResult:
    """CoTrain (alternating), CoTrain+PCGrad (both batches per step, projected) or
    IFT-CoTrain (alternating, PT task weights by IFT every ``ift_every`` steps)."""
    if ckpt is not None and ckpt.exists():
        sd = torch.load(ckpt, weights_only=False)
        return PTResult(sd["encoder"], sd["weights"], sd["info"])
    store = problem.store
    tasks = problem.meta_tasks(fold)
    net = _Net(s, store.num_pt_tasks, len(tasks), seed)
    params = {k: v.requires_grad_(True) for k, v in {**net.params, **{
        f"ft_head.{k}": v for k, v in net.ft_head.items()}}.items()}
    shared = [k for k in params if k.startswith("enc.")]
    opt = torch.optim.Adam(params.values(), lr=s.pt_lr)
    phi = {"logit": torch.zeros(store.num_pt_tasks, requires_grad=True)}
    meta_opt = meta_optimizer(s)(list(phi.values()))
    pt_loss_w, ft_loss = _weighted_pt_loss(net), _ft_loss(net, tasks)

    def ft_of(p: Params, b: GraphBatch) -> torch.Tensor:
        return ft_loss(p, {"weight": p["ft_head.weight"], "bias": p["ft_head.bias"]}, b)

    pt_stream = _stream(problem.split.pretrain, s.batch_size, seed)
    ft_stream = _stream(problem.ft_train, s.batch_size, seed + 1)
    mtr = _stream(problem.meta_train, s.batch_size, seed + 2)
    mva = _stream(problem.meta_val, s.batch_size, seed + 3)
    steps = s.pt_steps if variant == "pcgrad" else 2 * s.pt_steps
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc=f"cotrain-{variant}", leave=False, disable=not progress):
        opt.zero_grad(set_to_none=True)
        if variant == "pcgrad":
            pb, fb = store.batch(pt_stream(step)), store.batch(ft_stream(step))
            lp, lf = pt_loss_w(params, phi, pb), ft_of(params, fb)
            gp = torch.autograd.grad(lp, list(params.values()), allow_unused=True)
            gf = torch.autograd.grad(lf, list(params.values()), allow_unused=True)
            gp = dict(zip(params, gp))
            gf = dict(zip(params, gf))
            proj = _pcgrad([gp[k] for k in shared], [gf[k] for k in shared])
            for k, g in zip(shared, proj):
                params[k].grad = g
            for k in params:
                if k not in shared:
                    params[k].grad = gp[k] if gp[k] is not None else gf[k]
        else:
            i = step // 2
            if step % 2 == 0:
                loss = pt_loss_w(params, tree_detach(phi), store.batch(pt_stream(i)))
            else:
                loss = ft_of(params, store.batch(ft_stream(i)))
            loss.backward()
        opt.step()
        if variant == "ift" and step % 2 == 1 and (step // 2 + 1) % s.ift_every == 0:
            _ift_step(params, phi, meta_opt, net, pt_loss_w, ft_of, store,
                      pt_stream, mtr, mva, step // 2, s)
    info = {"total_time": time.perf_counter() - t0, "steps": steps}
    weights = (2 * torch.sigmoid(phi["logit"].detach())).tolist() if variant == "ift" else None
    res = PTResult(_strip(params), weights, info)
    if ckpt is not None and hd.is_main():
        atomic_save({"encoder": res.encoder, "weights": res.weights, "info": res.info}, ckpt)
    return res


def tree_detach(t: Params) -> Params:
    return {k: v.detach() for k, v in t.items()}


def _ift_step(params, phi, meta_opt, net, pt_loss_w, ft_of, store, pt_stream, mtr, mva, i, s):
    """One IFT hyper step (Lorraine et al. 2020): inner = weighted PT + FT-train loss on fixed
    batches, outer = FT loss on a meta-val batch; Neumann series with the PT lr as step."""
    pb, tb, vb = store.batch(pt_stream(i)), store.batch(mtr(i)), store.batch(mva(i))

    def inner(p: Params, h: Params) -> torch.Tensor:
        return pt_loss_w(p, h, pb) + ft_of(p, tb)

    def outer(p: Params, h: Params) -> torch.Tensor:
        return ft_of(p, vb)

    hyper = hg.implicit_grad(
        inner, outer, tree_detach(params), tree_detach(phi),
        solver=functools.partial(hg.neumann, iterations=s.ift_neumann, alpha=s.pt_lr),
        on_failure="ignore", stationarity_tol=None,
    )
    meta_opt.zero_grad(set_to_none=True)
    phi["logit"].grad = hyper["logit"].detach()
    meta_opt.step()


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
    variant = {"cotrain": "plain", "cotrain_pcgrad": "pcgrad", "ift_cotrain": "ift"}[method]
    return _cotrain(problem, s, seed, fold, variant, ckpt, progress)
