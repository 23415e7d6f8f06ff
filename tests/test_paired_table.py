"""tasks/paired_table.py: the shared paired renderer, through JSON and a RESULTS.md block."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

from tasks import paired_table
from tasks.paired_table import RENDERERS, paired_spec, render_paired, seed_range
from tasks.results_table import check_markdown, update_markdown

PER_SEED = {
    "no_pt": {0: 0.70, 1: 0.72, 2: 0.74},
    "graph_sup_pt": {0: 0.73, 1: 0.75, 2: 0.74},
    "meta_pt": {0: 0.75, 1: 0.74, 2: 0.76},
}


def test_docstring_example() -> None:
    assert doctest.testmod(paired_table).failed == 0


def test_seed_range() -> None:
    assert seed_range([2, 0, 1]) == "0-2" and seed_range([0, 2]) == "0,2" and seed_range([4]) == "4"


def test_render_through_json_round_trip() -> None:
    spec = paired_spec(
        "test AUROC",
        PER_SEED,
        ["no_pt", "graph_sup_pt"],
        scale=100,
        tuning_seeds="100-109",
        title="PPI labels stand-in",
        extra={"weight AUROC": {"meta_pt": "0.963"}},
    )
    text = render_paired(json.loads(json.dumps(spec)))
    lines = text.split("\n")
    assert lines[0] == (
        "PPI labels stand-in: test AUROC x 100 over seeds 0-2 (n = 3); "
        "choices made on seeds 100-109"
    )
    assert lines[2] == (
        "| method | test AUROC x 100, mean +- std | Δ vs graph_sup_pt [95% t-CI] (n)"
        " | weight AUROC |"
    )
    # graph_sup_pt is the strongest baseline (mean 74.0 > 72.0); meta_pt - it = +1.0 on average
    # per-seed differences meta - sup: +2, -1, +2 (x100): mean 1, sd sqrt(3), t_{.975,2} 4.303
    half = 4.303 * 3**0.5 / 3**0.5
    assert (
        f"| meta_pt | 75.0 +- 1.0 | +1.0 [{-half + 1:+.1f}, {half + 1:+.1f}] (n=3) | 0.963 |"
        in lines
    )
    assert "| graph_sup_pt | 74.0 +- 1.0 | baseline (strongest) | - |" in lines
    assert "| no_pt | 72.0 +- 2.0 | -2.0 [" in text


def test_lower_is_better_and_one_seed() -> None:
    spec = paired_spec(
        "error (deg)", {"ift": {0: 30.0}, "forward": {0: 2.0}}, ["ift"], higher_is_better=False
    )
    text = render_paired(spec)
    assert "| ift | 30.0 +- n/a (n=1) | baseline (strongest) |" in text
    assert "| forward | 2.0 +- n/a (n=1) | -28.0 [no interval: n=1] (n=1) |" in text


def test_plumbing_header() -> None:
    text = render_paired(paired_spec("AUROC", PER_SEED, ["no_pt"], plumbing=True))
    assert text.startswith("Plumbing check: not a result. AUROC over seeds 0-2")


def test_results_block_is_checked_against_the_json(tmp_path: Path) -> None:
    spec = paired_spec("AUROC", PER_SEED, ["no_pt"], scale=100)
    (tmp_path / "t.json").write_text(json.dumps(spec))
    md = tmp_path / "RESULTS.md"
    md.write_text("# R\n<!-- table: paired t.json -->\n<!-- /table -->\n")
    assert check_markdown(md, RENDERERS)  # empty block: stale
    assert update_markdown(md, RENDERERS) and check_markdown(md, RENDERERS) == []
    stale = PER_SEED | {"meta_pt": {0: 0.75, 1: 0.74, 2: 0.77}}  # one rerun changed a number
    (tmp_path / "t.json").write_text(json.dumps(paired_spec("AUROC", stale, ["no_pt"], scale=100)))
    assert len(check_markdown(md, RENDERERS)) == 1
