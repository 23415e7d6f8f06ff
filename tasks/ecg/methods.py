"""No PT, SimCLR and Meta SimCLR (Raghu et al. 2021, Section 6) on ECG arrays.

* ``pretrain``: SimCLR (NT-Xent on two crop -> jitter -> warp views) with fixed strengths, or
  Meta SimCLR whose per-example warp strength is ``w(x; phi)``, learned online with
  ``hg.MetaPretrainer`` (P PT steps, then one two-stage hypergradient: IFT through the PT
  optimum, K head-only FT steps on D_FT(Meta)-train, BCE on D_FT(Meta)-val).
* ``finetune``: the whole encoder plus a new linear head on D_FT-train, early stopping on the
  D_FT-val macro AUROC, test macro AUROC of the best epoch. No PT = ``finetune(None, ...)``.

Every PT batch is a deterministic function of its step index (indices and augmentation noise
from generators seeded by ``(seed, step)``): one hypergradient sees the same views at every
Hessian-vector product, and a resumed run sees the data an uninterrupted run sees. BatchNorm
runs on batch statistics through ``functional_forward`` (buffer copies), so no second-order
product touches running statistics; they are re-estimated on the PT pool after PT.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg
from models.ecg_phi import WarpStrengthNet
from models.resnet1d import (
    RESNET_CONFIGS,
    LinearHead,
    ProjectionHead,
    ResNet1d,
    functional_forward,
    recompute_bn_stats,
)
from tasks.ecg.augment import augment

__all__ = ["ECGConfig", "CONFIGS", "SimCLRNet", "nt_xent", "simclr_loss", "ft_bce", "macro_auroc",
           "pretrain", "finetune", "phi_strengths", "ift_solver", "with_overrides"]


@dataclass(frozen=True)
class ECGConfig:
    """Every setting of one reproduction run (the paper's are in ``CONFIGS["paper"]``)."""

    encoder: str = "small"  # key of models.resnet1d.RESNET_CONFIGS
    proj_dim: int = 64
    pt_batch: int = 64
    pt_lr: float = 1e-3
    pt_epochs: float = 10.0  # SimCLR epochs over the PT pool
    warmup: int = 3  # outer iterations of plain PT before the first meta step
    P: int = 10
    K: int = 1
    ft_unroll_lr: float = 0.1  # head step in the differentiable FT unroll
    meta_lr: float = 1e-2
    meta_batch: int = 64  # D_FT(Meta) train / val batch of one hypergradient
    temperature: float = 0.5
    crop: float = 0.5  # fraction of a lead zeroed at most (authors: 0.5)
    noise: float = 0.1  # jitter std at most, relative to the lead's std (authors: 0.1)
    warp: float = 25.0  # SimCLR's fixed warp strength = Meta SimCLR's initial one (samples^2)
    warp_max: float = 100.0
    warp_sigma: float = 15.0  # smoothing of the velocity field (samples)
    phi_channels: int = 16
    ft_epochs: int = 60
    ft_batch: int = 64
    ft_lr: float = 1e-3
    patience: int = 15
    bn_batches: int = 4  # PT-pool batches used to re-estimate BatchNorm statistics
    head_refit_steps: int = 10  # Adam steps on psi_FT after every meta iteration (0 = off)
    head_refit_lr: float = 1e-2
    neumann_terms: int = 3  # IFT inverse: Neumann series with alpha = pt_lr (authors' choice)
    neumann_damping: float = 1.0  # H + damping*I: online PT is non-convex (see ift_solver)

    def steps_per_epoch(self, n_pool: int) -> int:
        return max(1, n_pool // self.pt_batch)

    def outer_iterations(self, n_pool: int) -> int:
        return max(1, int(np.ceil(self.pt_epochs * self.steps_per_epoch(n_pool) / self.P)))


CONFIGS: dict[str, ECGConfig] = {
    "smoke": ECGConfig(encoder="tiny", proj_dim=16, pt_batch=16, pt_epochs=2.0, warmup=1, P=2,
                       meta_batch=16, phi_channels=4, ft_epochs=3, ft_batch=16, patience=2,
                       bn_batches=1, head_refit_steps=2),
    "default": ECGConfig(),
    # The authors' settings (simclr_ecg.py / simclr_eval.py): ResNet-18, batch 256, Adam 1e-4,
    # 50 PT epochs with one warm-up epoch, temperature 0.5, FT 200 epochs at 1e-3, batch 64.
    "paper": ECGConfig(encoder="paper", proj_dim=128, pt_batch=256, pt_lr=1e-4, pt_epochs=50.0,
                       warmup=8, meta_lr=1e-4, meta_batch=256, phi_channels=32, ft_epochs=200,
                       patience=200, bn_batches=8),
}


class SimCLRNet(nn.Module):
    """Encoder ``enc`` (1-D ResNet) and projection head ``proj``; parameters named enc.*, proj.*."""

    def __init__(self, cfg: ECGConfig, in_leads: int = 12) -> None:
        super().__init__()
        self.enc = ResNet1d(in_leads, **RESNET_CONFIGS[cfg.encoder])
        self.proj = ProjectionHead(self.enc.feature_dim, cfg.proj_dim)


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


def macro_auroc(y: np.ndarray, score: np.ndarray) -> tuple[float, list[float]]:
    """Mean AUROC over the labels that have both classes in ``y`` (NaN for the others)."""
    from sklearn.metrics import roc_auc_score

    per = [float(roc_auc_score(y[:, j], score[:, j])) if 0 < y[:, j].sum() < len(y)
           else float("nan") for j in range(y.shape[1])]
    ok = [a for a in per if not np.isnan(a)]
    return (float(np.mean(ok)) if ok else float("nan")), per


def _gen(*keys: int) -> torch.Generator:
    s = 0
    for k in keys:
        s = (s * 1_000_003 + int(k)) % (2**62)
    return torch.Generator().manual_seed(s)


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


def ift_solver(cfg: ECGConfig):
    """Damped truncated Neumann series for ``(H + damping I)^{-1} v`` with ``alpha = pt_lr``.

    Online PT sits nowhere near a minimum of the non-convex NT-Xent loss; the PT Hessian has
    small negative eigenvalues, so the undamped series' residual is ``1 + O(alpha |lambda_min|)``
    (measured 1.00015 at the first meta step), which ``MetaPretrainer`` rejects as divergence.
    Damping (a proximal term on theta_PT in the IFT) makes the operator positive definite.
    """
    damping = float(cfg.neumann_damping)

    def solve(matvec, b):
        op = matvec if damping == 0 else (lambda v: hg.tree.axpy(damping, v, matvec(v)))
        return hg.neumann(op, b, iterations=cfg.neumann_terms, alpha=cfg.pt_lr)

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
    outer: int | None = None, probe: Tensor | None = None,
) -> dict[str, Any]:
    """SimCLR (``method="simclr"``) or Meta SimCLR (``"meta_simclr"``) pre-training.

    ``meta_sets`` = ``((x_tr, y_tr), (x_val, y_val))``, D_FT(Meta), needed for Meta SimCLR.
    ``meta=False`` runs Meta SimCLR's loop without meta steps (the cost-ratio baseline).
    ``outer`` overrides the number of outer iterations. ``probe``: examples whose strengths
    are recorded after every meta step. Returns the encoder state (BatchNorm statistics
    re-estimated on the pool), phi's parameters, the history and wall times.
    """
    if method not in ("simclr", "meta_simclr"):
        raise ValueError(f"`method` must be 'simclr' or 'meta_simclr', got {method!r}")
    if method == "meta_simclr" and meta_sets is None:
        raise ValueError("`meta_sets` ((x_tr, y_tr), (x_val, y_val)) is needed for meta_simclr")
    torch.manual_seed(seed)
    dt = x_pool.dtype  # the models follow the data's dtype
    net = SimCLRNet(cfg, x_pool.shape[1]).to(dt)
    head = LinearHead(net.enc.feature_dim, 5 if meta_sets is None else meta_sets[0][1].shape[1])
    head = head.to(dt)
    is_meta = method == "meta_simclr"
    if is_meta:
        phi = WarpStrengthNet(x_pool.shape[1], cfg.phi_channels, init_strength=cfg.warp,
                              max_strength=cfg.warp_max).to(dt)
        hparams = dict(phi.named_parameters())

        def strength(h: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_forward(phi, h, x)
    else:
        hparams = {"warp": torch.tensor(float(cfg.warp), dtype=dt)}

        def strength(h: dict[str, Tensor], x: Tensor) -> Tensor:
            return h["warp"].expand(x.shape[0])

    def pt_loss(p: dict[str, Tensor], h: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        return simclr_loss(net, cfg, p, strength(h, batch["x"]), batch)

    def ft_loss(e: dict[str, Tensor], hd: dict[str, Tensor], batch: tuple[Tensor, Tensor]):
        return ft_bce(net, e, hd, batch)

    n, spe = len(x_pool), cfg.steps_per_epoch(len(x_pool))

    def pt_batch_fn(i: int) -> dict[str, Any]:
        perm = torch.randperm(n, generator=_gen(seed, 1, i // spe))
        idx = perm[(i % spe) * cfg.pt_batch : (i % spe + 1) * cfg.pt_batch]
        return {"x": x_pool[idx], "seed": int(_gen(seed, 2, i).initial_seed())}

    def ft_batch_fn(j: int):
        out = []
        for k, (xs, ys) in enumerate(meta_sets):
            if len(xs) > cfg.meta_batch:
                idx = torch.randperm(len(xs), generator=_gen(seed, 3 + k, j))[: cfg.meta_batch]
                xs, ys = xs[idx], ys[idx]
            out.append((xs, ys))
        return tuple(out)

    trainer = hg.MetaPretrainer(
        pt_loss=pt_loss, ft_loss=ft_loss, pt_params=dict(net.named_parameters()),
        ft_head=dict(head.fc.named_parameters()), hparams=hparams,
        encoder=lambda p: {k: v for k, v in p.items() if k.startswith("enc.")},
        pt_optimizer=lambda ts: torch.optim.Adam(ts, lr=cfg.pt_lr),
        meta_optimizer=lambda ts: torch.optim.Adam(ts, lr=cfg.meta_lr),
        P=cfg.P, K=cfg.K, ft_lr=cfg.ft_unroll_lr, head_only=True, meta=False,
        solver=ift_solver(cfg),
    )
    total = cfg.outer_iterations(n) if outer is None else int(outer)

    def callback(j: int, metrics: dict[str, Any]) -> None:
        # metrics is the dict stored in trainer.history, so what is added here is checkpointed
        if not trainer.meta:
            return
        if cfg.head_refit_steps:
            _refit_head(trainer, net, meta_sets[0], cfg)
        if probe is not None:
            metrics["probe"] = phi_strengths(phi, tree_detach(trainer.hparams), probe).tolist()

    do_meta = is_meta if meta is None else (bool(meta) and is_meta)
    t0 = time.perf_counter()
    warm = min(cfg.warmup, total) if do_meta else total
    trainer.run(warm, pt_batch_fn, ft_batch_fn, checkpoint=checkpoint, progress=progress,
                callback=callback)
    trainer.meta = do_meta
    trainer.run(total, pt_batch_fn, ft_batch_fn, checkpoint=checkpoint, progress=progress,
                callback=callback)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        for k, v in trainer.pt_params.items():
            net.get_parameter(k).copy_(v)
    idx = torch.randperm(n, generator=_gen(seed, 9))[: cfg.bn_batches * cfg.pt_batch]
    recompute_bn_stats(net.enc, x_pool[idx], cfg.pt_batch)
    hist = trainer.history
    probe_log = [h["probe"] for h in hist if "probe" in h]
    return {
        "enc_state": copy.deepcopy(net.enc.state_dict()),
        "pt_params": tree_detach(trainer.pt_params),
        "ft_head": tree_detach(trainer.ft_head),
        "phi": tree_detach(trainer.hparams) if is_meta else None,
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


def _predict(enc: nn.Module, head: nn.Module, x: Tensor, batch: int = 256) -> np.ndarray:
    enc.eval()
    with torch.no_grad():
        return torch.cat([head(enc(x[i : i + batch])) for i in range(0, len(x), batch)]).numpy()


def finetune(
    enc_state: dict[str, Tensor] | None, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor], cfg: ECGConfig, seed: int,
) -> dict[str, Any]:
    """FT the whole encoder and a new linear head; early stopping on val macro AUROC."""
    torch.manual_seed(seed)
    dt = train[0].dtype
    enc = ResNet1d(train[0].shape[1], **RESNET_CONFIGS[cfg.encoder]).to(dt)
    if enc_state is not None:
        enc.load_state_dict(enc_state)
    head = LinearHead(enc.feature_dim, train[1].shape[1]).to(dt)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=cfg.ft_lr)
    g = _gen(seed, 7)
    best, best_epoch, best_state, curve = -np.inf, -1, None, []
    x, y = train
    for epoch in range(cfg.ft_epochs):
        enc.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.ft_batch):
            idx = perm[i : i + cfg.ft_batch]
            if len(idx) < 2:  # BatchNorm needs two examples
                continue
            loss = F.binary_cross_entropy_with_logits(head(enc(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        auc, _ = macro_auroc(val[1].numpy(), _predict(enc, head, val[0]))
        curve.append(auc)
        if auc > best:
            best, best_epoch = auc, epoch
            best_state = (copy.deepcopy(enc.state_dict()), copy.deepcopy(head.state_dict()))
        if epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None:
        enc.load_state_dict(best_state[0])
        head.load_state_dict(best_state[1])
    test_auc, per_label = macro_auroc(test[1].numpy(), _predict(enc, head, test[0]))
    return {"test_auroc": test_auc, "test_auroc_per_label": per_label, "val_auroc": best,
            "best_epoch": best_epoch, "epochs_run": len(curve), "val_curve": curve}


def with_overrides(cfg: ECGConfig, **kw: Any) -> ECGConfig:
    """``cfg`` with the non-None keyword overrides applied (unknown names rejected)."""
    names = set(asdict(cfg))
    bad = [k for k in kw if k not in names]
    if bad:
        raise ValueError(f"unknown config field(s) {bad}; known: {sorted(names)}")
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
