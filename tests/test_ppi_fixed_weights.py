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
from tasks.ppi.fixed_weights import fixed_weights, pretrain_fixed
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
    fixed = pretrain_fixed("oracle_pt", ones, s, seed=0)
    plain = pretrain("graph_sup_pt", prob, s, seed=0, progress=False)
    assert fixed.weights == [1.0] * prob.store.num_pt_tasks
    for k in plain.encoder:
        torch.testing.assert_close(fixed.encoder[k], plain.encoder[k], rtol=0, atol=0)


def test_oracle_weighting_changes_the_run(problem) -> None:
    prob, s = problem
    oracle = pretrain_fixed("oracle_pt", prob, s, seed=0)
    plain = pretrain("graph_sup_pt", prob, s, seed=0, progress=False)
    assert oracle.weights == [float(r) for r in prob.relevance]
    assert any(not torch.equal(oracle.encoder[k], plain.encoder[k]) for k in plain.encoder)
