"""No PT, SimCLR and Meta SimCLR (Raghu et al. 2021, Section 6) on ECG arrays.

* ``pretrain``: SimCLR (NT-Xent on two crop -> jitter -> warp views) with fixed strengths, or
  Meta SimCLR whose per-example warp strength is ``w(x; phi)``, learned online with
  ``hg.MetaPretrainer`` (P PT steps, then one two-stage hypergradient: IFT through the PT
  optimum, K head-only FT steps on D_FT(Meta)-train, BCE on D_FT(Meta)-val).
* ``finetune`` (``tasks/ecg/finetune.py``, re-exported): the whole encoder plus a new linear
  head on D_FT-train, early stopping on the D_FT-val macro AUROC, test macro AUROC of the best
  epoch. No PT = ``finetune(None, ...)``. Settings: ``tasks/ecg/config.py``.

Every PT batch is a deterministic function of its step index (indices and augmentation noise
from generators seeded by ``(seed, step)``): one hypergradient sees the same views at every
Hessian-vector product, and a resumed run sees the data an uninterrupted run sees. BatchNorm
runs on batch statistics through ``functional_forward`` (buffer copies), so no second-order
product touches running statistics; they are re-estimated on the PT pool after PT.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg
from models import resnet1d
from models.ecg_phi import WarpStrengthNet
from tasks.ecg.augment import augment
from tasks.ecg.config import CONFIGS, ECGConfig, with_overrides
from tasks.ecg.finetune import finetune, macro_auroc, seeded_generator

__all__ = ["ECGConfig", "CONFIGS", "SimCLRNet", "nt_xent", "simclr_loss", "ft_bce", "macro_auroc",
           "pretrain", "finetune", "phi_strengths", "neumann_solver", "with_overrides",
           "seeded_generator"]

functional_forward = resnet1d.functional_forward
_gen = seeded_generator


class SimCLRNet(nn.Module):
    """Encoder ``enc`` (1-D ResNet) and projection head ``proj``; parameters named enc.*, proj.*."""

    def __init__(self, cfg: ECGConfig, in_leads: int = 12) -> None:
        super().__init__()
        self.enc = resnet1d.ResNet1d(in_leads, **resnet1d.RESNET_CONFIGS[cfg.encoder])
        self.proj = resnet1d.ProjectionHead(self.enc.feature_dim, cfg.proj_dim)


def _sub(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent loss: view i's positive is its partner; the other 2B-2 are negatives."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), -1e9)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, target)


def simclr_loss(net: SimCLRNet, cfg: ECGConfig, p: dict[str, Tensor], strengths: Tensor,
                batch: dict[str, Any]) -> Tensor:
    """NT-Xent of two crop -> jitter -> warp views of ``batch["x"]`` (warp strength per
    example), all noise drawn from a generator seeded by ``batch["seed"]``."""
    x, g = batch["x"], _gen(batch["seed"])
    views = [augment(x, g, crop=cfg.crop, noise=cfg.noise, warp=strengths,
                     warp_sigma=cfg.warp_sigma) for _ in range(2)]
    z = functional_forward(net.proj, _sub(p, "proj."),
                           functional_forward(net.enc, _sub(p, "enc."), torch.cat(views)))
    return nt_xent(z[: len(x)], z[len(x):], cfg.temperature)


def ft_bce(net: SimCLRNet, e: dict[str, Tensor], head: dict[str, Tensor],
           batch: tuple[Tensor, Tensor]) -> Tensor:
    """BCE of the linear head on the encoder's features (batch statistics in BatchNorm)."""
    x, y = batch
    feats = functional_forward(net.enc, _sub(e, "enc."), x)
    return F.binary_cross_entropy_with_logits(F.linear(feats, head["weight"], head["bias"]), y)


def neumann_solver(cfg: ECGConfig):
    """Truncated Neumann series for ``(H + damping I)^{-1} v`` with ``alpha = pt_lr``.

    The default is the authors' setting: 1 term and no damping, i.e. ``x = alpha * v`` (no
    Hessian product at all). Online PT is never near a minimum of the non-convex NT-Xent loss,
    so the PT Hessian has small negative eigenvalues and the relative residual
    ``|(I - alpha H) v| / |v|`` is ``1 + O(alpha |lambda_min|)`` (measured 1.00015);
    ``hg.MetaPretrainer`` warns once about that and only raises above its
    ``max_solve_residual`` (10). ``neumann_damping > 0`` solves ``(H + damping I) x = v``
    instead (a proximal term on theta_PT), which keeps the residual below 1 with more terms.
    """
    def solve(matvec, b):
        return hg.neumann(matvec, b, iterations=cfg.neumann_terms, alpha=cfg.pt_lr,
                          damping=float(cfg.neumann_damping))

    return solve


def phi_strengths(phi: nn.Module, params: dict[str, Tensor] | None, x: Tensor,
                  batch: int = 256) -> Tensor:
    """Warp strengths ``w(x; phi)`` of every example of ``x`` (no gradient)."""
    p = dict(phi.named_parameters()) if params is None else params
    with torch.no_grad():
        return torch.cat([functional_forward(phi, p, x[i : i + batch])
                          for i in range(0, len(x), batch)])


def pretrain(
    method: str, x_pool: Tensor, cfg: ECGConfig, seed: int, *, meta_sets=None,
    checkpoint: str | Path | None = None, progress: bool = True, meta: bool | None = None,
    outer: int | None = None, probe: Tensor | None = None, pool_strengths: Tensor | None = None,
) -> dict[str, Any]:
    """SimCLR (``method="simclr"``) or Meta SimCLR (``"meta_simclr"``) pre-training.

    ``meta_sets`` = ``((x_tr, y_tr), (x_val, y_val))``, D_FT(Meta), needed for Meta SimCLR.
    ``meta=False`` runs Meta SimCLR's loop without meta steps (the cost-ratio baseline).
    ``outer`` overrides the number of outer iterations. ``probe``: examples whose strengths
    are recorded after every meta step. ``pool_strengths`` (SimCLR only): a fixed warp
    strength for every pool example instead of ``cfg.warp`` (the synthetic task's ground-truth
    oracle, ``simclr_oracle``). Returns the encoder state (BatchNorm statistics
    re-estimated on the pool), phi's parameters, the history and wall times.
    """
    if method not in ("simclr", "meta_simclr"):
        raise ValueError(f"`method` must be 'simclr' or 'meta_simclr', got {method!r}")
    if method == "meta_simclr" and meta_sets is None:
        raise ValueError("`meta_sets` ((x_tr, y_tr), (x_val, y_val)) is needed for meta_simclr")
    n_pool = len(x_pool)
    if pool_strengths is not None and (method != "simclr" or pool_strengths.shape != (n_pool,)):
        raise ValueError(f"`pool_strengths` needs method 'simclr' and shape ({n_pool},), got "
                         f"{method!r} and {tuple(pool_strengths.shape)}")
    torch.manual_seed(seed)
    # the models follow the data's dtype and device (initialised on the CPU, then moved)
    dt, dev = x_pool.dtype, x_pool.device
    net = SimCLRNet(cfg, x_pool.shape[1]).to(dev, dt)
    n_labels = 5 if meta_sets is None else meta_sets[0][1].shape[1]
    head = resnet1d.LinearHead(net.enc.feature_dim, n_labels).to(dev, dt)
    is_meta = method == "meta_simclr"
    if is_meta:
        phi = WarpStrengthNet(x_pool.shape[1], cfg.phi_channels, init_strength=cfg.warp,
                              max_strength=cfg.warp_max).to(dev, dt)
        if cfg.phi_standardize:
            phi.calibrate(x_pool[torch.randperm(len(x_pool), generator=_gen(seed, 10))[:256]])
        hparams = dict(phi.named_parameters())

        def strength(h: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_forward(phi, h, x)
    else:
        hparams = {"warp": torch.tensor(float(cfg.warp), dtype=dt, device=dev)}

        def strength(h: dict[str, Tensor], x: Tensor) -> Tensor:
            return h["warp"].expand(x.shape[0])

    def pt_loss(p: dict[str, Tensor], h: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        s = batch["s"] if "s" in batch else strength(h, batch["x"])
        return simclr_loss(net, cfg, p, s, batch)

    def ft_loss(e: dict[str, Tensor], hd: dict[str, Tensor], batch: tuple[Tensor, Tensor]):
        return ft_bce(net, e, hd, batch)

    n, spe = len(x_pool), cfg.steps_per_epoch(len(x_pool))

    def pt_batch_fn(i: int) -> dict[str, Any]:
        perm = torch.randperm(n, generator=_gen(seed, 1, i // spe))
        idx = perm[(i % spe) * cfg.pt_batch : (i % spe + 1) * cfg.pt_batch]
        b = {"x": x_pool[idx], "seed": int(_gen(seed, 2, i).initial_seed())}
        if pool_strengths is not None:
            b["s"] = pool_strengths[idx].to(dev, dt)
        return b

    def ft_batch_fn(j: int):
        out = []
        for k, (xs, ys) in enumerate(meta_sets):
            if len(xs) > cfg.meta_batch:
                idx = torch.randperm(len(xs), generator=_gen(seed, 3 + k, j))[: cfg.meta_batch]
                xs, ys = xs[idx], ys[idx]
            out.append((xs, ys))
        return tuple(out)

    do_meta = is_meta if meta is None else (bool(meta) and is_meta)
    trainer = hg.MetaPretrainer(
        pt_loss=pt_loss, ft_loss=ft_loss, pt_params=dict(net.named_parameters()),
        ft_head=dict(head.fc.named_parameters()), hparams=hparams,
        encoder=lambda p: {k: v for k, v in p.items() if k.startswith("enc.")},
        pt_optimizer=lambda ts: torch.optim.Adam(ts, lr=cfg.pt_lr),
        meta_optimizer=lambda ts: torch.optim.Adam(ts, lr=cfg.meta_lr),
        P=cfg.P, K=cfg.K, ft_lr=cfg.ft_unroll_lr, head_only=True, meta=do_meta,
        solver=neumann_solver(cfg),
    )
    total = cfg.outer_iterations(n) if outer is None else int(outer)

    def callback(j: int, metrics: dict[str, Any]) -> None:
        # metrics is the dict stored in trainer.history, so what is added here is checkpointed
        if not trainer.meta or trainer.in_warmup:
            return
        if cfg.head_refit_steps:
            _refit_head(trainer, net, meta_sets[0], cfg)
        if probe is not None:
            metrics["probe"] = phi_strengths(phi, tree_detach(trainer.hparams), probe).tolist()

    t0 = time.perf_counter()
    warm = min(cfg.warmup, total) if do_meta else 0
    trainer.run(total - warm, pt_batch_fn, ft_batch_fn, warmup=warm, checkpoint=checkpoint,
                progress=progress, callback=callback)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        for k, v in trainer.pt_params.items():
            net.get_parameter(k).copy_(v)
    idx = torch.randperm(n, generator=_gen(seed, 9))[: cfg.bn_batches * cfg.pt_batch]
    resnet1d.recompute_bn_stats(net.enc, x_pool[idx], cfg.pt_batch)
    hist = trainer.history
    probe_log = [h["probe"] for h in hist if "probe" in h]
    return {
        "enc_state": copy.deepcopy(net.enc.state_dict()),
        "pt_params": tree_detach(trainer.pt_params),
        "ft_head": tree_detach(trainer.ft_head),
        "phi": tree_detach(trainer.hparams) if is_meta else None,
        "phi_buffers": tree_detach(dict(phi.named_buffers())) if is_meta else None,
        "history": hist,
        "probe_strengths": probe_log,
        "wall_time": wall,
        "pt_time": float(sum(h["pt_time"] for h in hist)),
        "meta_time": float(sum(h["meta_time"] for h in hist)),
        "outer_iterations": total,
        "meta_steps": sum(1 for h in hist if "hypergrad_norm" in h),
        "config": asdict(cfg),
    }


def fit_head(net: SimCLRNet, enc_params: dict[str, Tensor], head: dict[str, Tensor],
             train: tuple[Tensor, Tensor], cfg: ECGConfig) -> dict[str, Tensor]:
    """``cfg.head_refit_steps`` full-batch Adam steps of a linear head on frozen features."""
    x, y = train[0][:512], train[1][:512]
    with torch.no_grad():
        feats = functional_forward(net.enc, _sub(enc_params, "enc."), x)
    head = {k: v.detach().clone().requires_grad_(True) for k, v in head.items()}
    opt = torch.optim.Adam(list(head.values()), lr=cfg.head_refit_lr)
    for _ in range(cfg.head_refit_steps):
        loss = F.binary_cross_entropy_with_logits(
            F.linear(feats, head["weight"], head["bias"]), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return tree_detach(head)


def _refit_head(trainer: hg.MetaPretrainer, net: SimCLRNet, train: tuple[Tensor, Tensor],
                cfg: ECGConfig) -> None:
    """Refit the online FT head psi_FT on the current D_FT(Meta)-train features.

    The authors take an FT-head step after every PT step; ``MetaPretrainer`` moves psi_FT only
    by the K unrolled steps of each meta step, which leaves it near its random start for a
    short run. Deterministic (full batch), so an exact resume still holds.
    """
    new = fit_head(net, tree_detach(trainer.pt_params), trainer.ft_head, train, cfg)
    with torch.no_grad():
        for k, v in trainer.ft_head.items():
            v.copy_(new[k])


def tree_detach(t: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in t.items()}


