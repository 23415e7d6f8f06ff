"""PPI methods, FT protocol and CLI end to end on a tiny synthetic set (config ``smoke``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tasks.cli import main
from tasks.ppi.config import METHODS, get_config
from tasks.ppi.cotrain import _pcgrad
from tasks.ppi.data import load_ppi
from tasks.ppi.finetune import finetune, macro, make_problem
from tasks.ppi.methods import pretrain
from tasks.ppi.net import stream
from tasks.ppi.synthetic import SyntheticConfig, generate, read_meta, write_synthetic


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    s = get_config("smoke")
    root = write_synthetic(tmp_path_factory.mktemp("syn"), s.synthetic)
    return make_problem(load_ppi(root), s, read_meta(root)["relevance"]), s


def test_synthetic_ground_truth_and_format(tmp_path):
    cfg = SyntheticConfig(n_graphs=60, n_pt_tasks=10, n_ft_tasks=4, frac_pt_relevant=0.2,
                          frac_pt_irrelevant=0.4)
    graphs, meta = generate(cfg)
    assert len(graphs) == 60 and len(meta["relevance"]) == 10
    assert sum(meta["relevance"]) == 2 and meta["pt_kinds"].count("noise") == 4
    g = graphs[0]
    assert g.x.shape[1] == 1 and g.edge_attr.shape[1] == 9 and g.go_target_pretrain.shape == (10,)
    assert torch.equal(g.edge_index[:, 0::2], g.edge_index[:, 1::2].flip(0))  # both directions
    store = load_ppi(write_synthetic(tmp_path, cfg))
    assert (store.species_id == 9606).sum() == 12  # test species share
    # relevant PT tasks depend only on relevant factors, the others never do
    for spec, kind in zip(meta["pt_tasks"], meta["pt_kinds"]):
        if kind != "noise":
            rel = set(spec["factors"]) <= set(meta["relevant_factors"])
            assert rel == (kind == "relevant")
    # relevant signatures use interaction types 0..3 only, irrelevant ones 4..6 only
    n_rel = len(meta["relevant_factors"])
    assert all(max(sig) < 4 for sig in meta["signatures"][:n_rel])
    assert all(min(sig) >= 4 for sig in meta["signatures"][n_rel:])


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_end_to_end(problem, method):
    prob, s = problem
    res = pretrain(method, prob, s, seed=0, progress=False)
    assert (res.encoder is None) == (method == "no_pt")
    if method in ("meta_pt", "ift_cotrain"):
        w = np.asarray(res.weights)
        assert w.shape == (prob.store.num_pt_tasks,) and ((w > 0) & (w < 2)).all()
        assert not np.allclose(w, 1.0)  # the weights moved
    for mode in ("full", "linear"):
        out = finetune(res.encoder, prob, s, mode, seed=0)
        assert len(out["test_hard"]) == prob.store.num_ft_tasks
        assert 0.0 <= macro(out["valid"]) <= 1.0


def test_partial_access_hides_a_fold(problem):
    prob, s = problem
    tasks = prob.meta_tasks(0)
    assert len(tasks) == prob.store.num_ft_tasks - len(prob.folds[0])
    assert not set(tasks.tolist()) & set(prob.folds[0].tolist())
    res = pretrain("meta_pt", prob, s, seed=0, fold=0, progress=False)
    assert len(res.weights) == prob.store.num_pt_tasks


def test_meta_pt_resumes_from_its_checkpoint(problem, tmp_path):
    from dataclasses import replace

    prob, s = problem
    ckpt = tmp_path / "m.pt"
    pretrain("meta_pt", prob, replace(s, meta_steps=2), seed=1, ckpt=ckpt, progress=False)
    resumed = pretrain("meta_pt", prob, s, seed=1, ckpt=ckpt, progress=False)
    straight = pretrain("meta_pt", prob, s, seed=1, progress=False)
    for k in straight.encoder:
        torch.testing.assert_close(resumed.encoder[k], straight.encoder[k], rtol=0, atol=0)
    assert resumed.weights == straight.weights


def test_pcgrad_removes_conflicts():
    g1, g2 = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    (out,) = _pcgrad(g1, g2)
    assert float(out @ g1[0]) >= 0 and float(out @ g2[0]) >= 0
    (same,) = _pcgrad([torch.tensor([1.0, 1.0])], [torch.tensor([1.0, 0.0])])
    torch.testing.assert_close(same, torch.tensor([2.0, 1.0]))


def test_batch_stream_is_a_function_of_the_index():
    idx = torch.arange(10, 30)
    a, b = stream(idx, 8, seed=3), stream(idx, 8, seed=3)
    assert all(torch.equal(a(i), b(i)) for i in (5, 0, 7, 1))
    epoch0 = torch.cat([a(0), a(1)])
    assert len(set(epoch0.tolist())) == 16


def test_cli_runs_all_methods_both_protocols_and_resumes(tmp_path):
    out = tmp_path / "out"
    argv = ["ppi", "--method", "all", "--access", "both", "--seeds", "1", "--synthetic",
            "--config", "smoke", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    table = json.loads((out / "results.json").read_text())
    assert set(table) == {"no_pt", "graph_sup_pt", "cotrain", "cotrain_pcgrad", "meta_pt"}
    for row in table.values():
        assert {"full", "partial"} <= set(row)
    assert "weight_relevance_auroc" in table["meta_pt"]
    assert (out / "auroc.png").stat().st_size > 0 and (out / "weights.png").stat().st_size > 0
    assert "meta_pt" in (out / "results.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert len(stamps) == 2 + 3 * 5  # fold-free PT once; 3 methods x (full + 4 folds)
    assert main(argv) == 0  # everything is done: nothing reruns
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}


def test_cli_errors_name_the_argument(tmp_path, capsys):
    assert main(["ppi", "--method", "nope", "--config", "smoke", "--out", str(tmp_path)]) == 2
    assert "--method: unknown ['nope']" in capsys.readouterr().err
    assert main(["ppi", "--data-dir", str(tmp_path / "missing_dir"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "missing_dir: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_vary_data_gives_each_seed_its_own_stand_in_and_exports(tmp_path):
    """--vary-data: seed k runs on the stand-in of generator seed k (its own folder, other
    graphs); --export writes the paired tables with the command line that wrote them."""
    out, exp = tmp_path / "out", tmp_path / "res" / "labels.json"
    argv = ["ppi", "--method", "no_pt,corr_pt", "--vary-data", "--seeds", "0-1", "--config",
            "smoke", "--out", str(out), "--no-progress", "--export", str(exp)]
    assert main(argv) == 0
    meta = [json.loads((out / "data" / f"s{k}" / "synthetic_meta.json").read_text())
            for k in (0, 1)]
    assert meta[0]["config"]["seed"] == 0 and meta[1]["config"]["seed"] == 1
    d0, d1 = (torch.load(out / "data" / f"s{k}" / "processed" / "geometric_data_processed.pt",
                         weights_only=False) for k in (0, 1))
    assert not torch.equal(d0[0].go_target_pretrain, d1[0].go_target_pretrain)
    data = json.loads(exp.read_text())
    assert data["command"] == "python -m tasks " + " ".join(argv)
    spec = data["tables"]["full"]
    assert spec["plumbing"] is True and set(spec["per_seed"]) == {"no_pt", "corr_pt"}
    assert set(spec["per_seed"]["no_pt"]) == {"0", "1"}
    assert set(data["weight_relevance_auroc"]["corr_pt"]) == {"0", "1"}
    assert data["environment"]["torch"] == torch.__version__  # numbers depend on versions


def test_cli_vary_data_is_for_the_stand_in_only(tmp_path, capsys):
    assert main(["ppi", "--data-dir", str(tmp_path), "--vary-data", "--out",
                 str(tmp_path / "o")]) == 2
    assert "--vary-data and --stand-in apply to the synthetic stand-in only" in (
        capsys.readouterr().err)
