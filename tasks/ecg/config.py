"""Settings of one ECG reproduction run: ``ECGConfig`` and the named ``CONFIGS``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

__all__ = ["ECGConfig", "CONFIGS", "with_overrides"]


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
    meta_batch: int = 128  # D_FT(Meta) train / val batch of one hypergradient (all of val here)
    temperature: float = 0.5
    crop: float = 0.5  # fraction of a lead zeroed at most (authors: 0.5)
    noise: float = 0.1  # jitter std at most, relative to the lead's std (authors: 0.1)
    warp: float = 25.0  # SimCLR's fixed warp strength = Meta SimCLR's initial one (samples^2)
    warp_max: float = 100.0
    warp_sigma: float = 15.0  # smoothing of the velocity field (samples)
    phi_channels: int = 16
    phi_standardize: bool = False  # fixed standardisation of phi's features (models/ecg_phi.py)
    ft_epochs: int = 60
    ft_batch: int = 64
    ft_lr: float = 1e-3
    patience: int = 15
    bn_batches: int = 4  # PT-pool batches used to re-estimate BatchNorm statistics
    head_refit_steps: int = 10  # Adam steps on psi_FT after every meta iteration (0 = off)
    head_refit_lr: float = 1e-2
    # IFT inverse: truncated Neumann series with alpha = pt_lr; the authors use 1 term
    # (x = alpha * b), which needs no Hessian product and no damping (see methods.neumann_solver)
    neumann_terms: int = 1
    neumann_damping: float = 0.0  # solve (H + damping*I) instead (0 = the authors' setting)

    def __post_init__(self) -> None:
        from models.resnet1d import RESNET_CONFIGS
        from tasks.harness import check_fields

        check_fields(self, positive=("proj_dim", "pt_batch", "pt_lr", "pt_epochs", "P",
                                     "meta_batch", "temperature", "warp_max", "warp_sigma",
                                     "phi_channels", "ft_batch", "ft_lr", "bn_batches",
                                     "neumann_terms"),
                     nonneg=("warmup", "K", "ft_unroll_lr", "meta_lr", "noise", "warp",
                             "ft_epochs", "patience", "head_refit_steps", "head_refit_lr",
                             "neumann_damping"),
                     fraction=("crop",), choices={"encoder": RESNET_CONFIGS})
        if self.warp > self.warp_max:
            raise ValueError(f"`warp` ({self.warp}) must be <= `warp_max` ({self.warp_max})")

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


def with_overrides(cfg: ECGConfig, **kw: Any) -> ECGConfig:
    """``cfg`` with the non-None keyword overrides applied (unknown names rejected)."""
    names = set(asdict(cfg))
    bad = [k for k in kw if k not in names]
    if bad:
        raise ValueError(f"unknown config field(s) {bad}; known: {sorted(names)}")
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
