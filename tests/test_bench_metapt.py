"""benchmarks/metapt.py at tiny sizes: the authors' meta step and hypergrad's agree, and every
section of the benchmark runs (no timing assertion)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("higher")

from benchmarks import metapt  # noqa: E402


@pytest.mark.parametrize("name", metapt.PROBLEMS)
def test_authors_step_and_hypergrad_give_the_same_hypergradient(name):
    check = metapt.same_answer(name, torch.float64, tiny=True)
    assert check["hypergrad_norm"] > 0
    assert check["hypergrad_rel_err"] < 1e-10, check
    assert check["ft_head_rel_err"] < 1e-10, check
    assert check["phi_after_step_rel_err"] < 1e-10, check


def test_the_same_answer_check_can_fail():
    """A 3-term series on the authors' side (2 HVPs) is a different hypergradient."""
    prob = metapt.make("mlp", torch.float64, tiny=True)
    tr, au = metapt.pair(prob, 3)
    au.hvps = 2
    b = (prob.pt_batch(2), *prob.ft_batch(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = metapt.library_hypergradient(prob, tr, *b).hypergrad["logit"]
    theirs = au.hypergradient(*b)[0][0]
    assert float((mine - theirs).norm() / theirs.norm()) > 1e-3


def test_host_sync_counter_sees_conversions_and_restores_tensor():
    x = torch.ones(3)
    original = torch.Tensor.item
    with metapt.count_host_syncs() as c:
        bool(x.sum() > 0)
        float(x.sum())
        x.sum().item()
        x.tolist()
    assert c["syncs"] == 4
    assert torch.Tensor.item is original
    with metapt.count_host_syncs() as c2:
        pass
    float(x.sum())
    assert c2["syncs"] == 0


def test_benchmark_runs_at_tiny_size(tmp_path):
    out = tmp_path / "metapt.json"
    data = metapt.main(["--tiny", "--quiet", "--rounds", "1", "--problems", "mlp,gin,ecg",
                        "--no-memory", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["problem"] for r in saved["problems"]] == ["mlp", "gin", "ecg"]
    for r in data["problems"]:
        assert r["pt_step_units"]["library_meta_step"] > 0
        assert r["outer_ratio"]["library"] > 1
        assert r["host_syncs"]["authors_meta_step"]["syncs"] >= 0
    assert metapt.markdown(saved).count("\n| ") == 4  # header + 3 problems


def test_peak_memory_child_runs():
    rec = metapt.memory_child("mlp", "library_meta_step", "cpu", tiny=True)
    assert rec["peak_kib"] is None or rec["peak_kib"] >= 0
