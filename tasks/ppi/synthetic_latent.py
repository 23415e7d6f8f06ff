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

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data, InMemoryDataset

from .data import PROCESSED_NAME, TEST_SPECIES, TRAIN_VALID_SPECIES
from .synthetic import META_NAME, N_TYPES, SyntheticConfig, _task

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


def _graphs(
    rng: np.random.Generator,
    z: np.ndarray,
    signatures: list[tuple[int, int]],
    distractors: list[tuple[int, int]],
    species: np.ndarray,
    y_pt: np.ndarray,
    y_ft: np.ndarray,
    cfg: SyntheticConfig,
) -> list[Data]:
    """Ego-graphs with one arm per present factor plus distractor arms (synthetic.py's noise)."""
    graphs = []
    for g in range(len(z)):
        arms = [signatures[k] for k in np.flatnonzero(z[g])]
        lo, hi = cfg.distractor_arms
        arms += [
            distractors[i] for i in rng.integers(0, len(distractors), int(rng.integers(lo, hi + 1)))
        ]
        arms = [arms[i] for i in rng.permutation(len(arms))]
        edges, types, seconds, n = [], [], [], 1
        for a, b in arms:
            u, v = n, n + 1
            n += 2
            edges += [(0, u), (u, v)]
            types += [a, b]
            seconds.append(v)
            if rng.random() < 0.3:  # a leaf on the far node (3 hops: invisible to signatures)
                edges.append((v, n))
                types.append(int(rng.integers(N_TYPES)))
                n += 1
        for _ in range(int(rng.integers(0, 3))):  # edges among far nodes
            if len(seconds) >= 2:
                i, j = rng.choice(len(seconds), 2, replace=False)
                edges.append((seconds[i], seconds[j]))
                types.append(int(rng.integers(N_TYPES)))
        attr = np.zeros((len(edges), 9), dtype=np.float32)
        attr[np.arange(len(edges)), types] = 1.0
        attr[:, :N_TYPES] = np.maximum(
            attr[:, :N_TYPES], rng.random((len(edges), N_TYPES)) < cfg.extra_type_prob
        )
        e = np.asarray(edges, dtype=np.int64).T
        ei = np.stack([e, e[::-1]], axis=2).reshape(2, -1)  # both directions, interleaved
        perm = rng.permutation(n)  # the center is not always node 0
        graphs.append(
            Data(
                x=torch.ones(n, 1),
                edge_index=torch.from_numpy(np.ascontiguousarray(perm[ei])),
                edge_attr=torch.from_numpy(np.repeat(attr, 2, axis=0)),
                species_id=torch.tensor([int(species[g])]),
                center_node_idx=torch.tensor([int(perm[0])]),
                go_target_pretrain=torch.from_numpy(y_pt[g]),
                go_target_downstream=torch.from_numpy(y_ft[g]),
            )
        )
    return graphs


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

    n_rel = int(round(cfg.frac_pt_relevant * cfg.n_pt_tasks))
    n_irr = int(round(cfg.frac_pt_irrelevant * cfg.n_pt_tasks))
    kinds = ["relevant"] * n_rel + ["irrelevant"] * n_irr
    kinds += ["noise"] * (cfg.n_pt_tasks - len(kinds))
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    y_pt = np.zeros((cfg.n_graphs, cfg.n_pt_tasks), dtype=np.int64)
    pt_specs = []
    for j, kind in enumerate(kinds):
        if kind == "noise":
            p = rng.uniform(0.2, 0.6)
            y_pt[:, j] = (rng.random(cfg.n_graphs) < p).astype(np.int64)
            pt_specs.append({"rate": p})
        else:
            y_pt[:, j], spec = _task(rng, rel_f if kind == "relevant" else irr_f, z, cfg)
            pt_specs.append(spec)
    y_ft = np.zeros((cfg.n_graphs, cfg.n_ft_tasks), dtype=np.int64)
    ft_specs = []
    for j in range(cfg.n_ft_tasks):
        y_ft[:, j], spec = _task(rng, ft_f, z, cfg)
        ft_specs.append(spec)

    n_test = max(2, int(round(cfg.test_fraction * cfg.n_graphs)))
    species = np.array(
        [TEST_SPECIES[0]] * n_test
        + [TRAIN_VALID_SPECIES[i % len(TRAIN_VALID_SPECIES)] for i in range(cfg.n_graphs - n_test)]
    )[rng.permutation(cfg.n_graphs)]
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
    """``generate_latent`` written like ``synthetic.write_synthetic`` (same files, read by
    ``load_ppi`` / ``read_meta``); reused when the stored config matches. Returns root."""
    root = Path(root)
    path = root / "processed" / PROCESSED_NAME
    meta_path = root / META_NAME
    wanted = json.loads(json.dumps(asdict(cfg)))
    if (
        path.is_file()
        and meta_path.is_file()
        and json.loads(meta_path.read_text()).get("config") == wanted
    ):
        return root
    graphs, meta = generate_latent(cfg)
    data, slices = InMemoryDataset.collate(graphs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save((data, slices), tmp)
    tmp.replace(path)
    tmp_meta = meta_path.with_suffix(f".{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    tmp_meta.replace(meta_path)
    return root
