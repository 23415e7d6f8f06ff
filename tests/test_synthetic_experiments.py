"""The synthetic experiments end to end on tiny configs: outputs, resume, CLI, exactness."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from studies import exactness as E
from tasks.cli import main
from tasks.harness import parse_seeds
from tasks.synthetic import noisy as N
from tasks.synthetic import rotation as R


class Killed(RuntimeError):
    pass


def _kill_at(step):
    def cb(j, metrics):
        if j == step:
            raise Killed

    return cb


def test_angle_error_is_circular():
    assert R.angle_error(95.0) == 5.0
    assert R.angle_error(-270.0) == 0.0
    assert R.angle_error(-85.0) == 175.0
    assert R.angle_error(450.0 - 3) == 3.0


def test_rotation_tiny_run_and_resume(tmp_path):
    cfg = dataclasses.replace(R.CONFIGS["tiny"], meta_steps=6)
    full = R.run_one(cfg, seed=1, init_angle=30.0)
    assert len(full["phi_trajectory"]) == 6 and np.isfinite(full["phi"])
    assert full["phi"] != 30.0 and 0.0 <= full["probe_test_accuracy"] <= 1.0
    with pytest.raises(Killed):
        R.run_one(cfg, seed=1, init_angle=30.0, seed_dir=tmp_path, callback=_kill_at(3))
    assert (tmp_path / "ckpt.pt").exists()
    torch.manual_seed(12345)  # a new process would not share the RNG state
    resumed = R.run_one(cfg, seed=1, init_angle=30.0, seed_dir=tmp_path)
    assert resumed["phi_trajectory"] == full["phi_trajectory"]
    assert resumed["phi"] == full["phi"] and resumed["val_loss"] == full["val_loss"]


@pytest.mark.parametrize(
    "ift", ["neumann", "adam_neumann", "adam_momentum", "library_adam", "forward"])
def test_rotation_ift_variants_run(ift):
    cfg = dataclasses.replace(R.CONFIGS["tiny"], meta_steps=3, ift=ift, neumann_iterations=4)
    res = R.run_one(cfg, seed=2, init_angle=40.0)
    assert np.isfinite(res["phi"]) and res["phi"] != 40.0


def test_noisy_tiny_run_and_resume(tmp_path):
    cfg = dataclasses.replace(N.CONFIGS["tiny"], meta_steps=4, warmup=1, baseline=False)
    full = N.run_one(cfg, seed=0)
    assert len(full["weights_clean"]) + len(full["weights_noisy"]) > 0
    assert 0.0 <= full["auroc"] <= 1.0 and full["ratio"] > 0
    # the small-loss heuristic at the end of the warm-up, recomputed from a plain-PT trainer
    from tasks.synthetic.baselines import small_loss_weights
    from tasks.synthetic.metrics import weight_stats

    task = N.NoisyTask(cfg, 0)
    plain = task.trainer(meta=False)
    plain.run(cfg.warmup, task.pt_batch, task.ft_batch, progress=False)
    ref = weight_stats(small_loss_weights(task, plain.pt_params), task.noisy.numpy())
    assert full["small_loss_auroc"] == pytest.approx(ref["auroc"], abs=1e-12)
    with pytest.raises(Killed):
        N.run_one(cfg, seed=0, seed_dir=tmp_path, callback=_kill_at(2))
    resumed = N.run_one(cfg, seed=0, seed_dir=tmp_path)
    for key in ("ratio", "auroc", "weights_clean", "weights_noisy", "val_loss"):
        assert resumed[key] == full[key], key


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm", ["batch", "class", "none"])
def test_noisy_loss_variants_are_weighted_means(form, norm):
    cfg = dataclasses.replace(N.CONFIGS["tiny"], weight_form=form, normalize=norm)
    task = N.NoisyTask(cfg, 0)
    idx = task.pt_batch(0)
    loss = task.pt_loss(task.pt_params0, task.hparams0, idx)
    assert loss.dim() == 0 and torch.isfinite(loss)
    w = task.weights(task.hparams0, idx)
    assert bool(((w > 0) & (w < 1)).all())
    if form == "softmax":  # the weights of all labels of one image sum to one
        x = task.x_pt[idx[:1]].expand(10, -1, -1, -1)
        total = N.weight_probs(task.hparams0, x, torch.arange(10)).sum()
        torch.testing.assert_close(total, torch.tensor(1.0, dtype=total.dtype))


def test_noisy_labels_are_wrong_exactly_where_marked():
    task = N.NoisyTask(N.CONFIGS["tiny"], 0)
    from tasks.synthetic import data as D

    ds = D.load_digits(scale=1, side=8)
    sp = D.split(ds, 20, 20, 20, seed=0)
    assert torch.equal(task.y_pt != sp.pt.y, task.noisy)
    assert 0.4 < float(task.noisy.float().mean()) < 0.6


def test_auroc_matches_rank_definition():
    rng = np.random.default_rng(0)
    s = rng.normal(size=200).round(1)  # ties
    pos = rng.random(200) < 0.4
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[pos] for b in s[~pos]])
    assert abs(N.auroc(s, pos) - brute) < 1e-12
    assert N.auroc(np.array([1.0, 2.0]), np.array([False, True])) == 1.0
    assert np.isnan(N.auroc(np.array([1.0, 2.0]), np.array([True, True])))


def test_cli_rotation_writes_outputs_and_skips_finished_seeds(tmp_path, capsys):
    out = tmp_path / "rot"
    args = ["synthetic", "rotation", "--config", "tiny", "--seeds", "0-1", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["errors"]) == 2 and metrics["angle_unit"] == "degrees"
    assert metrics["init_angles"] == [0.0, 18.0]
    assert (out / "rotation.png").stat().st_size > 0
    assert metrics["time_ratio"]["ratio"] > 0 and metrics["time_ratio"]["outer"] == 2
    printed = capsys.readouterr().out
    assert "recovered angle" in printed and "hypergradient: forward-mode tangent" in printed
    before = (out / "seed0" / "result.json").stat().st_mtime_ns
    assert main(args) == 0  # rerun: finished seeds are reused, not recomputed
    assert (out / "seed0" / "result.json").stat().st_mtime_ns == before
    assert json.loads((out / "metrics.json").read_text())["errors"] == metrics["errors"]
    # other settings into the same --out would silently reuse these seeds: refused by name
    capsys.readouterr()
    assert main([*args, "--set", "K=3"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main([*args, "--set", "K=3", "--fresh"]) == 0


def test_cli_noisy_and_overrides(tmp_path, capsys):
    out = tmp_path / "noisy"
    assert main(["synthetic", "noisy", "--config", "tiny", "--out", str(out), "--no-progress",
                     "--set", "meta_steps=2", "--set", "weight_form=softmax"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["meta_steps"] == 2 and metrics["config"]["weight_form"] == "softmax"
    assert (out / "weights.png").exists() and "auroc_mean" in metrics
    assert metrics["plumbing"] and metrics["auroc_vs_small_loss"]["n"] == 1
    text = capsys.readouterr().out
    assert "Plumbing check: not a result. noisy labels" in text and "[no interval: n=1]" in text
    assert main(["synthetic", "noisy", "--config", "tiny", "--out", str(out), "--set",
                 "bogus=1"]) == 2
    assert "bogus: unknown key" in capsys.readouterr().err


def test_parse_seeds():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_seeds("3") == [0, 1, 2]  # a count, in every task


def test_exact_gradient_matches_finite_differences():
    """The 'exact' reference of the exactness study is the derivative of g(phi) itself."""
    cfg = dataclasses.replace(E.CONFIGS["tiny"], dtype="float64", T=3, K=2)
    task, h0 = E._task(cfg)
    r = E.exact_and_alg1(task, h0, cfg)

    def g(phi):
        return E.exact_and_alg1(task, {"phi": torch.tensor(phi, dtype=torch.float64)}, cfg)["val"]

    eps = 1e-4
    phi0 = float(h0["phi"])
    fd = (g(phi0 + eps) - g(phi0 - eps)) / (2 * eps)
    assert abs(float(r["exact"]["phi"]) - fd) <= 1e-6 * max(1.0, abs(fd))
    assert set(r["alg1"]) == {3, 20}


@pytest.mark.filterwarnings("ignore::hypergrad.HypergradientWarning")  # residual > 1: expected
def test_exactness_cli_tiny(tmp_path):
    out = tmp_path / "ex"
    assert E.main(["--config", "tiny", "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"compare_rotation_init54", "compare_noisy", "kp_table"} <= set(m)
    assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in m["compare_noisy"]["cosine"]["3"])
    assert (out / "exactness_rotation_init54.png").exists()


@pytest.mark.slow
def test_rotation_smoke_recovers_angle_from_inside_the_basin():
    cfg = R.CONFIGS["smoke"]
    res = R.run_one(cfg, seed=3, init_angle=54.0)
    assert res["error"] < 15.0


@pytest.mark.slow
def test_rotation_smoke_recovers_angle_from_far_starts():
    # 0 and 18 degrees: the IFT (ift="neumann") sends both to the mirror solution near -90
    for seed, init in ((0, 0.0), (1, 18.0)):
        res = R.run_one(R.CONFIGS["smoke"], seed=seed, init_angle=init)
        assert res["error"] < 15.0, (init, res["phi"])


def test_rotation_runs_on_mnist_idx_files(tmp_path):
    from tests.test_synthetic_data import _fixture

    _fixture(tmp_path, n=80, side=12)
    cfg = dataclasses.replace(R.CONFIGS["tiny"], data_dir=str(tmp_path), meta_steps=2)
    task = R.build(cfg, 0)
    assert task.side == 28 and len(task.pt) == 80 - 60  # padded to MNIST's 28x28
    res = R.run_one(cfg, seed=0, init_angle=45.0)
    assert np.isfinite(res["phi"])


def test_diagnose_screen_and_warm_landscape_run():
    from studies import rotation_landscape as diagnose

    cfg = dataclasses.replace(R.CONFIGS["tiny"], ift="neumann")
    rows = diagnose.screen(cfg, angles=(10.0, 100.0), pt_steps=3, n_batches=2)
    assert [r["angle"] for r in rows] == [10.0, 100.0]
    assert all(np.isfinite(r["hypergrad_mean"]) and len(r["per_batch"]) == 2 for r in rows)
    with pytest.raises(ValueError, match="ift=neumann"):  # it would silently measure Neumann
        diagnose.screen(R.CONFIGS["tiny"], angles=(10.0,), pt_steps=1, n_batches=1)
    warm = diagnose.warm_landscape(cfg, 10.0, (0.0, 5.0), pt_steps=3, more_steps=2)
    assert [r["delta"] for r in warm] == [0.0, 5.0]
    assert all(np.isfinite(r["val_loss"]) for r in warm)
