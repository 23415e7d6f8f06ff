"""Synthetic stand-in for the PPI data, in Hu et al.'s exact file layout, with known ground truth.

Each ego-graph carries binary latent factors ``z`` (``relevant`` ones and ``irrelevant`` ones).
Factor k has a signature, a pair of interaction types (a_k, b_k): when z_k = 1 the center gets
an "arm" center -a_k- u -b_k- v, so detecting a factor needs two hops of message passing on
edge types. Relevant factors draw their signatures from interaction types 0..3, irrelevant ones
from 4..6 (``relevant_types``); distractor arms (1-3 per graph) use the mixed pairs, which are
no signature. Leaves at 3 hops, edges among far nodes and random extra type bits add noise.
Node features are all ones, as in the real data.

Tasks are noisy linear-threshold functions of the factors, y = 1[w . z + logistic noise > t]
with sparse w:
  * FT tasks (``go_target_downstream``): functions of the relevant factors;
  * PT tasks (``go_target_pretrain``): a ``relevant`` share depends on the relevant factors (the
    ones FT needs), an ``irrelevant`` share on the unrelated factors, and a ``noise`` share is
    pure label noise independent of the graph.
``relevance`` (1 = relevant PT task) and the task kinds are saved next to the data in
``synthetic_meta.json``: the ground truth for the learned task weights.
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

__all__ = ["SyntheticConfig", "generate", "write_synthetic", "read_meta", "META_NAME"]

META_NAME = "synthetic_meta.json"
N_TYPES = 7


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and difficulty of the synthetic stand-in (defaults: the validation set)."""

    n_graphs: int = 2500
    test_fraction: float = 0.2
    n_relevant_factors: int = 6
    n_irrelevant_factors: int = 8
    factor_prob: float = 0.35
    n_pt_tasks: int = 200
    frac_pt_relevant: float = 0.1
    frac_pt_irrelevant: float = 0.45  # the rest of the PT tasks are pure noise
    n_ft_tasks: int = 40
    task_max_factors: int = 3
    label_temperature: float = 0.3  # scale of the logistic noise on w . z
    distractor_arms: tuple[int, int] = (1, 3)
    relevant_types: int = 4  # relevant signatures use interaction types 0..3, the others 4..6

    extra_type_prob: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_graphs < 8:
            raise ValueError(f"`n_graphs` must be >= 8, got {self.n_graphs}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"`test_fraction` must be in (0, 1), got {self.test_fraction}")
        if self.n_relevant_factors < 1 or self.n_irrelevant_factors < 1:
            raise ValueError("`n_relevant_factors` and `n_irrelevant_factors` must be >= 1")
        if not 1 <= self.relevant_types < N_TYPES:
            raise ValueError(
                f"`relevant_types` must be in [1, {N_TYPES}), got {self.relevant_types}"
            )
        if not 0 <= self.frac_pt_relevant + self.frac_pt_irrelevant <= 1:
            raise ValueError("`frac_pt_relevant + frac_pt_irrelevant` must be in [0, 1]")
        if self.n_pt_tasks < 1 or self.n_ft_tasks < 1:
            raise ValueError("`n_pt_tasks` and `n_ft_tasks` must be >= 1")


def _task(rng: np.random.Generator, factors: np.ndarray, z: np.ndarray, cfg: SyntheticConfig):
    """A noisy linear-threshold task on the columns ``factors`` of z; returns labels, spec."""
    k = int(rng.integers(1, min(cfg.task_max_factors, len(factors)) + 1))
    cols = rng.choice(factors, size=k, replace=False)
    w = rng.choice([-1.0, 1.0], size=k) * rng.uniform(0.7, 1.3, size=k)
    s = z[:, cols] @ w
    # threshold between the achievable values, so base rates vary but both classes occur
    t = float(np.quantile(s, rng.uniform(0.4, 0.8)))
    t = t - 1e-6 if rng.random() < 0.5 else t + 1e-6
    noise = rng.logistic(size=len(s)) * cfg.label_temperature
    y = (s + noise > t).astype(np.int64)
    return y, {"factors": cols.tolist(), "weights": w.tolist(), "threshold": t}


def _labels(rng: np.random.Generator, z: np.ndarray, rel_f: np.ndarray, irr_f: np.ndarray,
            ft_f: np.ndarray, cfg: SyntheticConfig):
    """PT task kinds (shuffled), PT labels and specs (relevant tasks on ``rel_f``, irrelevant
    on ``irr_f``, noise independent of z), then FT labels and specs on ``ft_f``."""
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
    return kinds, y_pt, pt_specs, y_ft, ft_specs


def _species(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    """A ``test_fraction`` share of the graphs from the test species, the rest round-robin."""
    n_test = max(2, int(round(cfg.test_fraction * cfg.n_graphs)))
    return np.array(
        [TEST_SPECIES[0]] * n_test
        + [TRAIN_VALID_SPECIES[i % len(TRAIN_VALID_SPECIES)] for i in range(cfg.n_graphs - n_test)]
    )[rng.permutation(cfg.n_graphs)]


def _graphs(rng: np.random.Generator, z: np.ndarray, signatures: list[tuple[int, int]],
            distractors: list[tuple[int, int]], species: np.ndarray, y_pt: np.ndarray,
            y_ft: np.ndarray, cfg: SyntheticConfig) -> list[Data]:
    """Ego-graphs with one arm per present factor plus distractor arms, far leaves, edges
    among far nodes and extra type bits (the noise described above)."""
    graphs = []
    for g in range(len(z)):
        arms = [signatures[k] for k in np.flatnonzero(z[g])]
        lo, hi = cfg.distractor_arms
        n_distract = int(rng.integers(lo, hi + 1))
        arms += [distractors[i] for i in rng.integers(0, len(distractors), n_distract)]
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
        # both directions, interleaved as in Hu et al.'s nx_to_graph_data_obj
        ei = np.stack([e, e[::-1]], axis=2).reshape(2, -1)
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


def generate(cfg: SyntheticConfig) -> tuple[list[Data], dict]:
    """Ego-graphs as PyG ``Data`` (Hu et al.'s fields) and the ground-truth metadata."""
    rng = np.random.default_rng(cfg.seed)
    n_f = cfg.n_relevant_factors + cfg.n_irrelevant_factors
    rt = cfg.relevant_types
    pairs = [(a, b) for a in range(N_TYPES) for b in range(N_TYPES)]
    rel_pairs = [p for p in pairs if p[0] < rt and p[1] < rt]
    irr_pairs = [p for p in pairs if p[0] >= rt and p[1] >= rt]
    if len(rel_pairs) < cfg.n_relevant_factors or len(irr_pairs) < cfg.n_irrelevant_factors:
        raise ValueError(
            f"`relevant_types`={rt} leaves {len(rel_pairs)} / {len(irr_pairs)} type pairs for "
            f"{cfg.n_relevant_factors} relevant / {cfg.n_irrelevant_factors} irrelevant factors"
        )
    rel_sig = [rel_pairs[i] for i in rng.permutation(len(rel_pairs))[: cfg.n_relevant_factors]]
    irr_sig = [irr_pairs[i] for i in rng.permutation(len(irr_pairs))[: cfg.n_irrelevant_factors]]
    signatures = rel_sig + irr_sig
    distractors = [p for p in pairs if p not in rel_pairs and p not in irr_pairs]
    z = (rng.random((cfg.n_graphs, n_f)) < cfg.factor_prob).astype(np.float64)
    relevant = np.arange(cfg.n_relevant_factors)
    irrelevant = np.arange(cfg.n_relevant_factors, n_f)

    kinds, y_pt, pt_specs, y_ft, ft_specs = _labels(rng, z, relevant, irrelevant, relevant, cfg)
    species = _species(rng, cfg)
    graphs = _graphs(rng, z, signatures, distractors, species, y_pt, y_ft, cfg)
    meta = {
        "config": asdict(cfg),
        "pt_kinds": kinds,
        "relevance": [int(k == "relevant") for k in kinds],
        "pt_tasks": pt_specs,
        "ft_tasks": ft_specs,
        "signatures": [list(s) for s in signatures],
        "relevant_factors": relevant.tolist(),
    }
    return graphs, meta


def write_synthetic(root: str | Path, cfg: SyntheticConfig, generator=None) -> Path:
    """Write ``root/processed/geometric_data_processed.pt`` (InMemoryDataset layout) and
    ``root/synthetic_meta.json`` from ``generator(cfg)`` (default :func:`generate`); reuse them
    when the stored config matches. Returns root."""
    root = Path(root)
    path = root / "processed" / PROCESSED_NAME
    meta_path = root / META_NAME
    wanted = json.loads(json.dumps(asdict(cfg)))
    if (path.is_file() and meta_path.is_file()
            and json.loads(meta_path.read_text()).get("config") == wanted):
        return root
    graphs, meta = (generator or generate)(cfg)
    data, slices = InMemoryDataset.collate(graphs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent writers never share a tmp file
    torch.save((data, slices), tmp)
    tmp.replace(path)
    tmp_meta = meta_path.with_suffix(f".{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    tmp_meta.replace(meta_path)
    return root


def read_meta(root: str | Path) -> dict:
    """The ground truth written next to a synthetic dataset."""
    p = Path(root) / META_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no synthetic metadata at `{p}` (is this a synthetic dataset?)")
    return json.loads(p.read_text())
