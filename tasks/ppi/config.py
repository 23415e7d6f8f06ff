"""Run settings for the PPI reproduction: ``smoke`` (tests), ``synthetic`` (our validation),
``paper`` (Hu et al. / Raghu et al. sizes for the real data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from models.gin import PAPER, GINConfig

from .synthetic import SyntheticConfig

__all__ = ["Settings", "CONFIGS", "get_config", "METHODS", "PT_METHODS"]

PT_METHODS = ("no_pt", "graph_sup_pt", "cotrain", "cotrain_pcgrad", "meta_pt", "ift_cotrain")
# fixed-weight baselines of issue 20 (fixed_weights.py): Corr-weighted PT and Oracle PT
METHODS = (*PT_METHODS, "corr_pt", "oracle_pt")


@dataclass(frozen=True)
class Settings:
    """Everything one (method, seed) run needs; PT steps = ``P * meta_steps`` for all methods."""

    gin: GINConfig = field(default_factory=GINConfig)
    batch_size: int = 64  # PT / CoTrain batches
    meta_batch_size: int | None = 100  # FT-train/-val batches of a meta step (None: batch_size)
    pt_lr: float = 1e-3
    meta_steps: int = 200  # outer iterations of Algorithm 1
    pt_epochs: float | None = None  # if set, meta_steps = pt_epochs * |D_PT| / (batch_size * P)
    P: int = 10
    K: int = 1
    meta_lr: float = 0.1
    meta_optimizer: str = "nsgd"  # on phi: "nsgd" (RMS-normalised SGD), "adam" or "sgd"
    ft_unroll_lr: float = 2.0  # plain-GD step of the head in the K unrolled FT steps
    neumann_terms: int = 1  # "one Neumann term with the PT lr as the Neumann step"
    ft_epochs: int = 50
    ft_patience: int = 10  # early stopping on validation AUROC
    ft_lr_full: float = 1e-3
    ft_lr_linear: float = 1e-2
    ft_batch_size: int = 32
    ft_train_size: int | None = 200  # subsample the FT train split (None = all, as Hu et al.)
    meta_val_frac: float = 0.5  # D_FT(Meta) split into meta-train / meta-val
    eval_batch_size: int = 512
    n_folds: int = 4  # partial access: folds of held-out FT tasks
    ift_every: int = 10  # IFT-CoTrain: PT steps between hyper steps
    ift_neumann: int = 5
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        for name in ("batch_size", "meta_steps", "P", "ft_epochs", "ft_batch_size",
                     "eval_batch_size", "n_folds", "ift_every", "neumann_terms"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not 0 < self.meta_val_frac < 1:
            raise ValueError(f"`meta_val_frac` must be in (0, 1), got {self.meta_val_frac}")

    def for_data(self, n_pretrain: int) -> Settings:
        """Resolve ``pt_epochs`` into ``meta_steps`` for a PT set of ``n_pretrain`` graphs."""
        if self.pt_epochs is None:
            return self
        steps = max(1, round(self.pt_epochs * n_pretrain / (self.batch_size * self.P)))
        return replace(self, meta_steps=steps, pt_epochs=None)

    @property
    def pt_steps(self) -> int:
        return self.P * self.meta_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CONFIGS: dict[str, Settings] = {
    # seconds: a tiny dataset and model, for tests and a first look
    "smoke": Settings(
        gin=GINConfig(num_layers=2, emb_dim=8),
        batch_size=16, meta_batch_size=16, meta_steps=3, P=2, ft_epochs=2, ft_patience=2,
        ft_train_size=32, ft_batch_size=16, eval_batch_size=64, ift_every=2, ift_neumann=2,
        synthetic=SyntheticConfig(n_graphs=120, n_pt_tasks=12, n_ft_tasks=8,
                                  n_relevant_factors=2, n_irrelevant_factors=2,
                                  frac_pt_relevant=0.25, frac_pt_irrelevant=0.35),
    ),
    # the synthetic validation (a few CPU minutes per run)
    "synthetic": Settings(),
    # Hu et al.'s GIN and schedule, the authors' learning rates (meant for the real data, GPU)
    "paper": Settings(
        gin=PAPER, batch_size=32, meta_batch_size=32, pt_lr=1e-4, meta_lr=1.0,
        meta_optimizer="sgd", ft_unroll_lr=1e-4, pt_epochs=100.0,
        ft_epochs=50, ft_patience=50, ft_lr_full=1e-5, ft_lr_linear=1e-4,
        ft_batch_size=32, ft_train_size=None, eval_batch_size=320,
    ),
}


def get_config(name: str, **overrides: Any) -> Settings:
    """A named config with fields replaced by ``overrides`` (``None`` values are ignored)."""
    if name not in CONFIGS:
        raise ValueError(f"`config` must be one of {sorted(CONFIGS)}, got {name!r}")
    return replace(CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})
