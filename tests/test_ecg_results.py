"""The issue-20 pieces of the ECG task: ``--vary-data`` (each seed its own synthetic data,
the same seed the same data), ``--export`` (the JSON RESULTS.md renders, naming its command)
and the renderers of tasks/ecg/results_tables.py."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch

from tasks.cli import main
from tasks.ecg.cli import data_seed
from tasks.ecg.plots import plot_strengths
from tasks.ecg.results_tables import (
    RENDERERS,
    ecg_contrasts,
    ecg_strengths,
    ecg_time,
    strength_stats,
)
from tasks.ecg.task import synthetic_task
from tasks.results_table import PLUMBING


def test_vary_data_seeds_are_distinct_per_run_seed_and_fixed_without_it():
    assert [data_seed(k, True) for k in range(3)] == [20000, 20002, 20004]
    assert {data_seed(k, False) for k in range(3)} == {12345}
    # pool k and test k (seed + 1) never coincide with another seed's pool or test set
    used = [s + t for k in range(10) for s in [data_seed(k, True)] for t in (0, 1)]
    assert len(set(used)) == len(used)


def test_vary_data_gives_other_data_per_seed_and_the_same_data_for_the_same_seed():
    a0 = synthetic_task(40, 30, data_seed(0, True))
    a0_again = synthetic_task(40, 30, data_seed(0, True))
    a1 = synthetic_task(40, 30, data_seed(1, True))
    assert torch.equal(a0.x, a0_again.x) and torch.equal(a0.x_test, a0_again.x_test)
    assert np.array_equal(a0.group, a0_again.group)
    assert not torch.equal(a0.x, a1.x) and not torch.equal(a0.x_test, a1.x_test)
    assert a0.data_seed == 20000 and a1.data_seed == 20002


ARGV = [
    "ecg",
    "--config",
    "smoke",
    "--method",
    "no_pt,simclr_nowarp,meta_simclr",
    "--n-ft",
    "20",
    "--seeds",
    "0-1",
    "--vary-data",
    "--n-pool",
    "40",
    "--n-test",
    "30",
    "--set",
    "pt_batch=8",
    "--set",
    "meta_batch=8",
    "--set",
    "ft_epochs=2",
    "--set",
    "pt_epochs=1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ecg_export")
    argv = [*ARGV, "--out", str(tmp / "out"), "--export", str(tmp / "r.json")]
    assert main(argv) == 0
    return tmp, argv, json.loads((tmp / "r.json").read_text())


def test_export_names_its_exact_command_and_the_data_of_each_seed(exported):
    tmp, argv, data = exported
    assert data["command"] == "python -m tasks " + shlex.join(argv)
    assert data["data_seeds"] == {"0": 20000, "1": 20002}
    assert data["plumbing"] is True and data["settings"]["vary_data"] is True
    runs = [json.loads(p.read_text()) for p in sorted((tmp / "out" / "runs").iterdir())]
    assert {(r["seed"], r["data_seed"]) for r in runs} == {(0, 20000), (1, 20002)}


def test_export_holds_per_seed_values_per_label_set_and_size(exported):
    _, _, data = exported
    assert set(data["tables"]) == {"all", "timing", "morphology"}
    spec = data["tables"]["all"]["20"]
    assert set(spec["per_seed"]) == {"no_pt", "simclr_nowarp", "meta_simclr"}
    assert RENDERERS["ecg_auroc"](data).index("| no_pt") < RENDERERS["ecg_auroc"](data).index(
        "| meta_simclr"
    )  # rows in the task's order, not the JSON's sorted keys
    assert all(set(v) == {"0", "1"} for v in spec["per_seed"].values())
    assert spec["baselines"] == ["no_pt", "simclr_nowarp"]  # the meta method is no baseline
    d = data["summary"]["contrasts"]["meta_simclr-no_pt"]["all"]["20"]
    per = spec["per_seed"]
    assert d["n"] == 2
    assert d["mean"] == pytest.approx(
        np.mean([per["meta_simclr"][k] - per["no_pt"][k] for k in ("0", "1")])
    )
    assert set(data["strengths"]["runs"]["20"]) == {"0", "1"}


def test_every_renderer_marks_a_smoke_export_as_plumbing(exported):
    _, _, data = exported
    for name, render in RENDERERS.items():
        if name == "ecg_time":
            continue  # no --time-ratio in this run
        assert render(data).startswith(PLUMBING.capitalize()), name


def test_vary_data_resume_refuses_the_fixed_data_run(exported, capsys):
    tmp, _, _ = exported
    argv = [a for a in ARGV if a != "--vary-data"] + ["--out", str(tmp / "out")]
    assert main(argv) == 2  # one output folder never mixes varied and fixed data
    assert "other settings" in capsys.readouterr().err


def test_vary_data_needs_the_synthetic_stand_in(tmp_path, capsys):
    assert (
        main(["ecg", "--data-dir", str(tmp_path), "--vary-data", "--out", str(tmp_path / "o")]) == 2
    )
    assert "--vary-data" in capsys.readouterr().err


def test_strength_stats_pair_timing_with_the_other_groups_within_each_run():
    runs = {
        "0": {"normal": 20.0, "timing": 21.0, "morphology": 22.0},
        "1": {"normal": 30.0, "timing": 30.5, "morphology": 30.0},
        "2": {"normal": 40.0, "timing": 40.0, "morphology": 41.0},
    }
    s = strength_stats(runs)
    assert s["timing_minus_rest"]["mean"] == pytest.approx((0.0 + 0.5 - 0.5) / 3)
    assert s["timing_minus_rest"]["lo"] < 0 < s["timing_minus_rest"]["hi"]
    assert s["mean"]["normal"] == pytest.approx(30.0)
    table = ecg_strengths({"strengths": {"init": 25.0, "max": 100.0, "runs": {"100": runs}}})
    assert "possible range 0 to 100" in table and "| timing | 30.50 +- 9.50 |" in table


def test_contrasts_are_paired_on_shared_seeds():
    spec = {
        "metric": "AUROC",
        "scale": 100,
        "baselines": ["no_pt"],
        "per_seed": {"no_pt": {"0": 0.80, "1": 0.90}, "meta_simclr": {"0": 0.81, "1": 0.91}},
    }
    table = ecg_contrasts({"tables": {lab: {"100": spec} for lab in ("all",)}})
    # the seeds' shared 10-point spread cancels: +1.0 on both seeds, a zero-width interval
    assert "| meta_simclr - no_pt | all | +1.0 [+1.0, +1.0] (n=2) |" in table


def test_time_table_reports_meta_step_in_pt_steps():
    t = {
        "outer": 10,
        "P": 10,
        "K": 1,
        "repeats": 3,
        "neumann_terms": 1,
        "ratio": 1.3,
        "ratio_median": 1.35,
        "cpu_ratio": 1.32,
        "plain_seconds": [12.0, 10.0, 11.0],
        "meta_seconds": [13.5, 13.0, 14.0],
    }
    out = ecg_time({"time_ratio": t})
    assert "| 10 x 3 (P = 10, K = 1, 1 Neumann term) | 100 ms | 300 ms = 3.0 PT steps |" in out
    assert "1.30x wall" in out


def test_strength_plot_spans_the_whole_strength_range(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    save = plt.Figure.savefig

    def spy(fig, *a, **kw):
        seen["xlim"] = fig.axes[0].get_xlim()
        return save(fig, *a, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    runs = {(100, 0): {"normal": [25.0, 25.1], "timing": [25.0, 25.2], "morphology": [25.1]}}
    path = plot_strengths(runs, tmp_path / "s.png", max_strength=100.0, init=25.0)
    assert path.stat().st_size > 0
    assert seen["xlim"] == (0.0, 100.0)
