"""The renderers of tasks/ppi/RESULTS.md: what each table says, checked on hand-made JSON."""

from __future__ import annotations

from tasks.paired_table import paired_spec
from tasks.ppi.results_tables import ppi_full, ppi_pairs, ppi_untuned

PER = {
    "no_pt": {0: 0.700, 1: 0.710, 2: 0.690},
    "graph_sup_pt": {0: 0.720, 1: 0.705, 2: 0.700},
    "meta_pt": {0: 0.800, 1: 0.730, 2: 0.720},
}
DATA = {
    "stand_in": "labels",
    "tables": {"full": paired_spec("test AUROC", PER, ["no_pt", "graph_sup_pt"], scale=100)},
    "weight_relevance_auroc": {"meta_pt": {"0": 0.5, "1": 0.9, "2": 0.7}},
}


def test_pairs_give_the_paired_mean_difference_and_the_seeds_ahead() -> None:
    rows = {r.split(" | ")[0].strip("| "): r for r in ppi_pairs(DATA).splitlines()[2:]}
    # meta - graph_sup per seed: +8.0, +2.5, +2.0 -> mean +4.2, ahead at all 3
    assert "+4.2 [" in rows["meta_pt - graph_sup_pt"]
    assert "3 of 3 (seeds 0-2)" in rows["meta_pt - graph_sup_pt"]
    # graph_sup - no_pt: +2.0, -0.5, +1.0 -> ahead at 2 of 3
    assert "2 of 3" in rows["graph_sup_pt - no_pt"]
    assert not any("corr_pt" in k for k in rows)  # pairs of methods that did not run are left out


def test_untuned_drops_seed_0_from_values_and_weight_aurocs() -> None:
    full, untuned = ppi_full(DATA), ppi_untuned(DATA)
    assert "over seeds 0-2 (n = 3)" in full and "over seeds 1-2 (n = 2)" in untuned
    assert "0.700 +- 0.200 (n=3)" in full  # weight AUROCs 0.5, 0.9, 0.7
    assert "0.800 +- 0.141 (n=2)" in untuned  # 0.9, 0.7
    meta = next(r for r in untuned.splitlines() if r.startswith("| meta_pt"))
    assert meta.startswith("| meta_pt | 72.5 +- 0.7 |")
