"""A harder PPI stand-in: PT tasks relevant through shared graph structure, not shared labels.

In ``synthetic.py`` relevant PT tasks are functions of the FT tasks' own latent factors, so
their labels correlate with FT labels and a label-correlation heuristic finds them (issue 20:
AUROC 0.998). Here three independent sets of binary factors live in every ego-graph:

* FT factors: the FT tasks are noisy linear-threshold functions of these only;
* relevant-PT factors: relevant PT tasks are functions of these only; they are other factors,
  drawn independently, so relevant PT labels are independent of every FT label;
* irrelevant-PT factors: irrelevant PT tasks; noise PT tasks stay independent of the graph.

A factor is a two-hop arm center -a- u -b- v with a signature pair (a, b) of interaction types.
FT and relevant-PT factors take disjoint pairs from the same types 0..``relevant_types``-1, and
irrelevant-PT factors pairs of the other types: detecting a relevant-PT factor trains the edge
types and two-hop composition the FT tasks need. That shared machinery is what ``relevance``
(1 = relevant PT task) marks. Graph noise, sizes, species and the file layout are
``synthetic.py``'s; the plan and its checks were declared before measuring (issue 20 note).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch_geometric.data import Data

from .synthetic import N_TYPES, SyntheticConfig, _graphs, _labels, _species, write_synthetic

__all__ = ["LatentConfig", "generate_latent", "write_latent"]


@dataclass(frozen=True)
class LatentConfig(SyntheticConfig):
    """``SyntheticConfig`` plus ``n_ft_factors``; ``n_relevant_factors`` counts the
    relevant-PT factors (independent of the FT factors, same interaction-type pool)."""

    n_ft_factors: int = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_ft_factors < 1:
            raise ValueError(f"`n_ft_factors` must be >= 1, got {self.n_ft_factors}")


def generate_latent(cfg: LatentConfig) -> tuple[list[Data], dict]:
    """Ego-graphs (Hu et al.'s fields) and ground truth; relevance through structure."""
    rng = np.random.default_rng(cfg.seed)
    rt = cfg.relevant_types
    pairs = [(a, b) for a in range(N_TYPES) for b in range(N_TYPES)]
    shared_pairs = [p for p in pairs if p[0] < rt and p[1] < rt]
    other_pairs = [p for p in pairs if p[0] >= rt and p[1] >= rt]
    n_shared = cfg.n_ft_factors + cfg.n_relevant_factors
    if len(shared_pairs) < n_shared or len(other_pairs) < cfg.n_irrelevant_factors:
        raise ValueError(
            f"`relevant_types`={rt} leaves {len(shared_pairs)} / {len(other_pairs)} type pairs "
            f"for {cfg.n_ft_factors} FT + {cfg.n_relevant_factors} relevant-PT / "
            f"{cfg.n_irrelevant_factors} irrelevant-PT factors"
        )
    sh = [shared_pairs[i] for i in rng.permutation(len(shared_pairs))[:n_shared]]
    irr = [other_pairs[i] for i in rng.permutation(len(other_pairs))[: cfg.n_irrelevant_factors]]
    signatures = sh + irr  # FT factors, then relevant-PT, then irrelevant-PT
    distractors = [p for p in pairs if p not in shared_pairs and p not in other_pairs]
    n_f = n_shared + cfg.n_irrelevant_factors
    z = (rng.random((cfg.n_graphs, n_f)) < cfg.factor_prob).astype(np.float64)
    ft_f = np.arange(cfg.n_ft_factors)
    rel_f = np.arange(cfg.n_ft_factors, n_shared)
    irr_f = np.arange(n_shared, n_f)

    kinds, y_pt, pt_specs, y_ft, ft_specs = _labels(rng, z, rel_f, irr_f, ft_f, cfg)
    species = _species(rng, cfg)
    graphs = _graphs(rng, z, signatures, distractors, species, y_pt, y_ft, cfg)
    meta = {
        "config": asdict(cfg),
        "relevance_kind": "structure",
        "pt_kinds": kinds,
        "relevance": [int(k == "relevant") for k in kinds],
        "pt_tasks": pt_specs,
        "ft_tasks": ft_specs,
        "signatures": [list(s) for s in signatures],
        "ft_factors": ft_f.tolist(),
        "relevant_factors": rel_f.tolist(),
    }
    return graphs, meta


def write_latent(root: str | Path, cfg: LatentConfig) -> Path:
    """``generate_latent`` written by ``synthetic.write_synthetic`` (same files, read by
    ``load_ppi`` / ``read_meta``); reused when the stored config matches. Returns root."""
    return write_synthetic(root, cfg, generate_latent)
