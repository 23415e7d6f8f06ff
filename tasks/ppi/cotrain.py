"""CoTrain baselines of Raghu et al. 2021, Table 1, on the same GIN as Meta-PT.

* ``plain``: one network with PT and FT heads, alternating PT and D_FT batches.
* ``pcgrad``: per step one PT and one FT batch; where their encoder gradients conflict each is
  projected on the normal plane of the other (PCGrad, Yu et al. 2020).
* ``ift``: CoTrain whose PT task weights are tuned by single-stage IFT hyperparameter
  optimisation (``hg.implicit_grad``, Lorraine et al. 2020), every ``ift_every`` steps.

Under torchrun these run identically on every rank (not data parallel); rank 0 writes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

import hypergrad as hg
from hypergrad import distributed as hd
from tasks.common import atomic_save
from tasks.harness import load_file

from .config import Settings
from .data import GraphBatch, GraphStore
from .finetune import Problem
from .net import (
    Loss3,
    Net,
    Params,
    PTResult,
    ft_loss_fn,
    meta_optimizer,
    stream,
    strip_encoder,
    weighted_pt_loss,
)

__all__ = ["cotrain"]

Stream = Callable[[int], torch.Tensor]


def _pcgrad(g1: list[torch.Tensor], g2: list[torch.Tensor]) -> list[torch.Tensor]:
    """PCGrad for two tasks: remove from each gradient its component along the other when
    they conflict (negative inner product), then sum."""
    dot = sum((a * b).sum() for a, b in zip(g1, g2))
    if dot >= 0:
        return [a + b for a, b in zip(g1, g2)]
    n1 = sum((a * a).sum() for a in g1).clamp_min(1e-20)
    n2 = sum((b * b).sum() for b in g2).clamp_min(1e-20)
    return [(a - dot / n2 * b) + (b - dot / n1 * a) for a, b in zip(g1, g2)]


def cotrain(
    problem: Problem, s: Settings, seed: int, fold: int | None, variant: str,
    ckpt: Path | None, progress: bool,
) -> PTResult:
    """CoTrain (alternating), CoTrain+PCGrad (both batches per step, projected) or
    IFT-CoTrain (alternating, PT task weights by IFT every ``ift_every`` steps)."""
    if ckpt is not None and ckpt.exists():
        sd = load_file(ckpt, map_location=problem.store.device)
        return PTResult(sd["encoder"], sd["weights"], sd["info"])
    store = problem.store
    tasks = problem.meta_tasks(fold)
    net = Net(s, store.num_pt_tasks, len(tasks), seed, device=store.device)
    tasks = tasks.to(store.device)
    params = {k: v.requires_grad_(True) for k, v in {**net.params, **{
        f"ft_head.{k}": v for k, v in net.ft_head.items()}}.items()}
    shared = [k for k in params if k.startswith("enc.")]
    opt = torch.optim.Adam(params.values(), lr=s.pt_lr)
    phi = {"logit": torch.zeros(store.num_pt_tasks, device=store.device, requires_grad=True)}
    meta_opt = meta_optimizer(s)(list(phi.values()))
    pt_loss_w, ft_loss = weighted_pt_loss(net), ft_loss_fn(net, tasks)

    def ft_of(p: Params, b: GraphBatch) -> torch.Tensor:
        return ft_loss(p, {"weight": p["ft_head.weight"], "bias": p["ft_head.bias"]}, b)

    pt_stream = stream(problem.split.pretrain, s.batch_size, seed)
    ft_stream = stream(problem.ft_train, s.batch_size, seed + 1)
    mtr = stream(problem.meta_train, s.batch_size, seed + 2)
    mva = stream(problem.meta_val, s.batch_size, seed + 3)
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
                loss = pt_loss_w(params, hg.tree.detach(phi), store.batch(pt_stream(i)))
            else:
                loss = ft_of(params, store.batch(ft_stream(i)))
            loss.backward()
        opt.step()
        if variant == "ift" and step % 2 == 1 and (step // 2 + 1) % s.ift_every == 0:
            _ift_step(params, phi, meta_opt, pt_loss_w, ft_of, store,
                      pt_stream, mtr, mva, step // 2, s)
    info = {"total_time": time.perf_counter() - t0, "steps": steps}
    weights = (2 * torch.sigmoid(phi["logit"].detach())).tolist() if variant == "ift" else None
    res = PTResult(strip_encoder(params), weights, info)
    if ckpt is not None and hd.is_main():
        atomic_save({"encoder": res.encoder, "weights": res.weights, "info": res.info}, ckpt)
    return res


def _ift_step(
    params: Params, phi: Params, meta_opt: torch.optim.Optimizer,
    pt_loss_w: Loss3, ft_of: Callable[[Params, GraphBatch], torch.Tensor], store: GraphStore,
    pt_stream: Stream, mtr: Stream, mva: Stream, i: int, s: Settings,
) -> None:
    """One IFT hyper step (Lorraine et al. 2020): inner = weighted PT + FT-train loss on fixed
    batches, outer = FT loss on a meta-val batch; Neumann series with the PT lr as step."""
    pb, tb, vb = store.batch(pt_stream(i)), store.batch(mtr(i)), store.batch(mva(i))

    def inner(p: Params, h: Params) -> torch.Tensor:
        return pt_loss_w(p, h, pb) + ft_of(p, tb)

    def outer(p: Params, h: Params) -> torch.Tensor:
        return ft_of(p, vb)

    hyper = hg.implicit_grad(
        inner, outer, hg.tree.detach(params), hg.tree.detach(phi),
        solver=functools.partial(hg.neumann, iterations=s.ift_neumann, alpha=s.pt_lr),
        on_failure="ignore", stationarity_tol=None,
    )
    meta_opt.zero_grad(set_to_none=True)
    phi["logit"].grad = hyper["logit"].detach()
    meta_opt.step()
