"""The harder PPI stand-in (tasks/ppi/synthetic_latent.py): relevance is still defined, through
shared interaction types, while the label-correlation heuristic falls to chance (it finds the
relevant tasks on the label-overlap stand-in of the same sizes). Generator seed 100: a tuning
seed, never a reported one."""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tasks.ppi.baselines import corr_weights_for_problem, label_correlation_scores
from tasks.ppi.config import get_config
from tasks.ppi.data import load_ppi
from tasks.ppi.finetune import make_problem
from tasks.ppi.synthetic import read_meta, write_synthetic
from tasks.ppi.synthetic_latent import LatentConfig, generate_latent, write_latent

SEED = 100


def _cfg(**kw) -> LatentConfig:
    base = asdict(get_config("synthetic").synthetic)
    base["distractor_arms"] = tuple(base["distractor_arms"])
    return LatentConfig(**{**base, "seed": SEED, **kw})


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    s = get_config("synthetic")
    out = {}
    for name, write, cfg in (
        ("structure", write_latent, _cfg()),
        ("labels", write_synthetic, replace(s.synthetic, seed=SEED)),
    ):
        root = write(tmp_path_factory.mktemp(name), cfg)
        meta = read_meta(root)
        out[name] = (make_problem(load_ppi(root), s, meta["relevance"]), meta)
    return out


def test_relevance_is_defined_through_shared_interaction_types(problems) -> None:
    _, meta = problems["structure"]
    cfg = _cfg()
    assert meta["relevance_kind"] == "structure"
    assert sum(meta["relevance"]) == round(cfg.frac_pt_relevant * cfg.n_pt_tasks) == 20
    ft_f, rel_f = set(meta["ft_factors"]), set(meta["relevant_factors"])
    assert not ft_f & rel_f
    sig = meta["signatures"]
    # FT and relevant-PT factors: disjoint signature pairs from the same types 0..3
    shared = [tuple(sig[k]) for k in sorted(ft_f | rel_f)]
    assert len(set(shared)) == len(shared) and all(max(p) < cfg.relevant_types for p in shared)
    others = [tuple(sig[k]) for k in range(len(sig)) if k not in ft_f | rel_f]
    assert all(min(p) >= cfg.relevant_types for p in others)
    for task in meta["ft_tasks"]:
        assert set(task["factors"]) <= ft_f
    for kind, task, r in zip(meta["pt_kinds"], meta["pt_tasks"], meta["relevance"]):
        assert r == (kind == "relevant")
        if kind == "relevant":
            assert set(task["factors"]) <= rel_f
        elif kind == "irrelevant":
            assert not set(task["factors"]) & (ft_f | rel_f)


def test_heuristic_is_near_chance_on_structure_but_not_on_labels(problems) -> None:
    p_s, _ = problems["structure"]
    p_l, _ = problems["labels"]
    auc_s = roc_auc_score(p_s.relevance, corr_weights_for_problem(p_s))
    auc_l = roc_auc_score(p_l.relevance, corr_weights_for_problem(p_l))
    assert auc_l > 0.95  # the label-overlap stand-in gives relevance away (measured 1.000)
    # 20 relevant vs 180 others, 200 graphs: chance AUROC has sd ~0.07 (declared band)
    assert 0.35 <= auc_s <= 0.65  # measured 0.388
    # and on all 2500 graphs the relevant PT labels stay uncorrelated with FT labels
    st = p_s.store
    score = label_correlation_scores(st.y_pt.numpy(), st.y_ft.numpy())
    rel = np.asarray(p_s.relevance, dtype=bool)
    assert score[rel].max() < 0.1  # measured 0.077 (others: 0.080)
    assert 0.35 <= roc_auc_score(rel, score) <= 0.65  # measured 0.526


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="`n_ft_factors` must be >= 1"):
        _cfg(n_ft_factors=0)
    with pytest.raises(ValueError, match="leaves 16 / 9 type pairs for 11 FT"):
        generate_latent(_cfg(n_ft_factors=11, n_graphs=20))


def _fingerprint(graphs, meta) -> str:
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for g in graphs:
        for k in ("x", "edge_index", "edge_attr", "species_id", "center_node_idx",
                  "go_target_pretrain", "go_target_downstream"):
            h.update(getattr(g, k).double().numpy().tobytes())  # dtype-proof
    return h.hexdigest()[:16]


@pytest.mark.parametrize("seed, labels, structure", [
    (0, "1331cfefc34c1fc7", "9483394bb7de4bfc"), (3, "608c26837f876fe4", "92418c5c7d0043c5")])
def test_generators_are_unchanged_bit_for_bit(seed, labels, structure) -> None:
    """Both stand-ins share the graph / label / species code of synthetic.py; the fingerprints
    were taken before that sharing (each generator had its own copy), so the data are the same."""
    from tasks.ppi.synthetic import SyntheticConfig, generate

    assert _fingerprint(*generate(SyntheticConfig(n_graphs=60, seed=seed))) == labels
    assert _fingerprint(*generate_latent(LatentConfig(n_graphs=60, seed=seed))) == structure
