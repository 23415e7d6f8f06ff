"""Corr-weighted PT / Oracle PT as PT methods (tasks/ppi/fixed_weights.py), on config smoke."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tasks.ppi.baselines import corr_weights_for_problem
from tasks.ppi.config import get_config
from tasks.ppi.data import load_ppi
from tasks.ppi.finetune import make_problem
from tasks.ppi.fixed_weights import fixed_weights
from tasks.ppi.methods import pretrain
from tasks.ppi.synthetic import read_meta, write_synthetic


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    s = get_config("smoke")
    root = write_synthetic(tmp_path_factory.mktemp("syn"), s.synthetic)
    return make_problem(load_ppi(root), s, read_meta(root)["relevance"]), s


def test_weights_of_each_method(problem) -> None:
    prob, _ = problem
    np.testing.assert_array_equal(fixed_weights("oracle_pt", prob), prob.relevance)
    np.testing.assert_array_equal(
        fixed_weights("corr_pt", prob, 1), corr_weights_for_problem(prob, 1)
    )
    with pytest.raises(ValueError, match="`method` must be one of"):
        fixed_weights("meta_pt", prob)
    with pytest.raises(ValueError, match="needs the ground-truth relevance"):
        fixed_weights("oracle_pt", replace(prob, relevance=None))


def test_unit_weights_reproduce_graph_sup_pt_exactly(problem) -> None:
    """With every task relevant the oracle's weights are all 1 (phi = 0): the very run of
    Graph Sup PT, so only the weighting separates the fixed-weight methods from it."""
    prob, s = problem
    ones = replace(prob, relevance=[1] * prob.store.num_pt_tasks)
    fixed = pretrain("oracle_pt", ones, s, seed=0, progress=False)
    plain = pretrain("graph_sup_pt", prob, s, seed=0, progress=False)
    assert fixed.weights == [1.0] * prob.store.num_pt_tasks
    for k in plain.encoder:
        torch.testing.assert_close(fixed.encoder[k], plain.encoder[k], rtol=0, atol=0)


def test_oracle_weighting_changes_the_run(problem) -> None:
    prob, s = problem
    oracle = pretrain("oracle_pt", prob, s, seed=0, progress=False)
    plain = pretrain("graph_sup_pt", prob, s, seed=0, progress=False)
    assert oracle.weights == [float(r) for r in prob.relevance]
    assert any(not torch.equal(oracle.encoder[k], plain.encoder[k]) for k in plain.encoder)


def test_cli_runs_the_fixed_weight_methods_with_a_paired_column(tmp_path) -> None:
    import json

    from tasks.cli import main

    out = tmp_path / "out"
    argv = ["ppi", "--method", "no_pt,corr_pt,oracle_pt", "--seeds", "2", "--config", "smoke",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    table = json.loads((out / "results.json").read_text())
    assert set(table) == {"no_pt", "corr_pt", "oracle_pt"}
    # the oracle's record carries the oracle weights (1 on the relevant tasks)
    rec = json.loads((out / "runs" / "oracle_pt__shared__s1.json").read_text())
    assert rec["weight_relevance_auroc"] == 1.0 and set(rec["weights"]) == {0.0, 1.0}
    base = table["oracle_pt"]["full"]["paired"]["baseline"]
    assert base in ("no_pt", "corr_pt")  # the strongest baseline, never the oracle itself
    p = table["oracle_pt"]["full"]["paired"]
    assert p["n"] == 2 and p["lo"] <= p["mean"] <= p["hi"]
    text = (out / "results.md").read_text()
    assert text.startswith("Plumbing check: not a result.")  # smoke config
    assert f"full: Δ vs {base} [95% t-CI] (n)" in text and "baseline (strongest)" in text
