"""The synthetic task's results path (issue 20): both rotation hypergradients side by side,
the exported JSON, its tables, and the tuning rule.

References are computed here from the per-seed files the runs write (and scipy's t quantile),
not by the code under test.
"""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pytest
from scipy.stats import t as student_t

from tasks.cli import main
from tasks.synthetic import results_tables as T
from tasks.synthetic import rotation as R
from tasks.synthetic.tune import main as tune_main
from tasks.synthetic.tune import pick


def test_docstring_examples() -> None:
    assert doctest.testmod(T).failed == 0


def test_modes_and_mirror_basin() -> None:
    assert R.modes(R.CONFIGS["smoke"]) == ["forward", "neumann"]
    assert R.modes(R.CONFIGS["paper"]) == ["forward", "neumann"]
    assert R.modes(R.CONFIGS["tiny"]) == ["forward"]
    # -90 is the FT angle 90 plus 180: the mirror solution; 180 is equidistant (not mirror)
    assert R.mirror_basin(-85.0) and R.mirror_basin(265.0) and R.mirror_basin(-33.0)
    assert not R.mirror_basin(85.0) and not R.mirror_basin(180.0) and not R.mirror_basin(0.0)


def test_bad_also_ift_is_refused() -> None:
    with pytest.raises(ValueError, match="also_ift"):
        R.RotationConfig(also_ift="bogus")
    with pytest.raises(ValueError, match="also_ift='forward' needs pt_optimizer='adam'"):
        R.RotationConfig(ift="neumann", also_ift="forward", pt_optimizer="sgd")


def _t_interval(d: list[float]) -> tuple[float, float]:
    m, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    half = student_t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    return m - half, m + half


def test_rotation_both_hypergradients_and_export(tmp_path, capsys) -> None:
    out, exp = tmp_path / "rot", tmp_path / "res" / "rot.json"
    args = [
        "synthetic",
        "rotation",
        "--config",
        "tiny",
        "--seeds",
        "0-1",
        "--out",
        str(out),
        "--set",
        "also_ift=neumann",
        "--set",
        "meta_steps=2",
        "--no-progress",
        "--export",
        str(exp),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Plumbing check: not a result" in printed and "neumann - forward" in printed
    per = {
        m: [json.loads((out / m / f"seed{s}" / "result.json").read_text()) for s in (0, 1)]
        for m in ("forward", "neumann")
    }
    assert (out / "rotation.png").stat().st_size > 0
    data = json.loads(exp.read_text())
    assert data["command"] == "python -m tasks " + " ".join(args)
    assert data["plumbing"] and data["modes"] == ["forward", "neumann"]
    ift, fwd = data["labels"]["neumann"], data["labels"]["forward"]
    assert data["table"]["per_seed"][ift] == {
        str(s): r["error"] for s, r in zip((0, 1), per["neumann"])
    }
    assert data["final_phi"][fwd] == [r["phi"] for r in per["forward"]]
    d = [a["error"] - b["error"] for a, b in zip(per["neumann"], per["forward"])]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["paired"]["mean"] == pytest.approx(np.mean(d))
    assert (metrics["paired"]["lo"], metrics["paired"]["hi"]) == pytest.approx(_t_interval(d))
    worse = ift if np.mean(d) > 0 else fwd  # the row the table pairs against the other
    got = data["summary"]["paired"][worse]
    ref = d if worse == ift else [-x for x in d]
    assert got["mean"] == pytest.approx(np.mean(ref)) and got["n"] == 2
    assert (got["lo"], got["hi"]) == pytest.approx(_t_interval(ref))
    means = {m: data["summary"]["methods"][m]["mean"] for m in (ift, fwd)}
    assert means == pytest.approx(
        {
            ift: np.mean([r["error"] for r in per["neumann"]]),
            fwd: np.mean([r["error"] for r in per["forward"]]),
        }
    )
    table = T.synthetic_rotation(data)
    assert table.startswith("Plumbing check: not a result.") and "(n=2)" in table
    lo, hi = _t_interval([-x for x in d] if np.mean(d) < 0 else d)
    assert f"[{lo:+.2f}, {hi:+.2f}] (n=2)" in table
    # the old single-run layout in the same --out is refused by the settings guard
    assert main([*args[:-2], "--set", "also_ift=none"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_pick_follows_the_rule() -> None:
    per = {"1": {0: 3.0, 1: 5.0}, "2": {0: 2.0, 1: 6.0}, "3": {0: 1.0, 1: 9.0}}
    assert pick(["1", "2", "3"], per, lower=True) == "1"  # tie 4.0 / 4.0: the first listed
    assert pick(["2", "1", "3"], per, lower=True) == "2"
    assert pick(["1", "2", "3"], per, lower=False) == "3"


def test_tune_cli_writes_the_rule_and_the_pick(tmp_path) -> None:
    exp = tmp_path / "tune.json"
    argv = [
        "noisy",
        "--config",
        "tiny",
        "--seeds",
        "100-101",
        "--grid",
        "meta_lr=0.01,0.02",
        "--set",
        "meta_steps=2",
        "--out",
        str(tmp_path / "t"),
        "--export",
        str(exp),
    ]
    assert tune_main(argv) == 0
    data = json.loads(exp.read_text())
    assert data["command"] == "python -m tasks.synthetic.tune " + " ".join(argv)
    ratios = {
        v: json.loads((tmp_path / "t" / f"meta_lr={v}" / "metrics.json").read_text())["ratio"]
        for v in ("0.01", "0.02")
    }
    assert data["picked"] == max(ratios, key=lambda v: (np.mean(ratios[v]), v == "0.01"))
    assert "Picked: **meta_lr=" in T.synthetic_tuning(data)


def test_weight_histogram_keeps_every_example(tmp_path) -> None:
    """Weights below the floor (even exact zeros) land in the first bin, and the x label
    counts them, instead of falling off the log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.synthetic.plots import plot_weights

    closed = []
    real_close = plt.close
    plt.close = lambda fig=None: closed.append(fig)  # keep the figure to inspect it
    try:
        plot_weights([0.5, 1e-12], [0.0, 1e-3, 0.2], tmp_path / "w.png", floor=1e-8)
    finally:
        plt.close = real_close
    ax = closed[0].axes[0]
    counts = [sum(p.get_height() for p in c) for c in ax.containers]
    assert counts == [2, 3] and "2 weights below 1e-08" in ax.get_xlabel()
    assert (tmp_path / "w.png").stat().st_size > 0
    real_close(closed[0])
