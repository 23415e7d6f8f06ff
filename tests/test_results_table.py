"""tasks/results_table.py on a fixture RESULTS.md: stale tables are caught, fresh ones pass,
update rewrites only the blocks, and numbers outside blocks are held to the JSON."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest

from tasks import results_table
from tasks.results_table import (
    PLUMBING,
    check_markdown,
    find_blocks,
    json_numbers,
    markdown_table,
    plumbing_title,
    unbacked_numbers,
    update_markdown,
)


def _render_auroc(data: dict) -> str:
    """A renderer as a task would register it: AUROC x 100, mean +- std per method."""
    rows = [
        [m, f"{100 * v['mean']:.1f} +- {100 * v['std']:.1f}", v["n"]]
        for m, v in data["methods"].items()
    ]
    title = plumbing_title("Test AUROC x 100", data.get("plumbing", False))
    return title + "\n\n" + markdown_table(["method", "AUROC", "n"], rows)


RENDERERS = {"auroc": _render_auroc}
DATA = {
    "methods": {
        "no_pt": {"mean": 0.723, "std": 0.017, "n": 3},
        "meta_pt": {"mean": 0.750, "std": 0.003, "n": 3},
    }
}


def _fixture(tmp_path: Path, body: str) -> Path:
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "auroc.json").write_text(json.dumps(DATA))
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "# Results\n\nProse 1.5 stays.\n\n<!-- table: auroc res/auroc.json -->\n"
        f"{body}\n<!-- /table -->\n\nAfter the table.\n"
    )
    return md


FRESH = (
    "Test AUROC x 100\n\n| method | AUROC | n |\n|---|---|---|\n"
    "| no_pt | 72.3 +- 1.7 | 3 |\n| meta_pt | 75.0 +- 0.3 | 3 |"
)


def test_docstring_example() -> None:
    assert doctest.testmod(results_table).failed == 0


def test_fresh_table_passes(tmp_path: Path) -> None:
    md = _fixture(tmp_path, FRESH)
    assert check_markdown(md, RENDERERS) == []
    assert not update_markdown(md, RENDERERS)


def test_stale_number_is_reported_with_a_diff(tmp_path: Path) -> None:
    md = _fixture(tmp_path, FRESH.replace("72.3", "71.0"))
    problems = check_markdown(md, RENDERERS)
    assert len(problems) == 1
    assert "RESULTS.md:5: table `auroc` is stale against res/auroc.json" in problems[0]
    assert "-| no_pt | 71.0 +- 1.7 | 3 |" in problems[0]
    assert "+| no_pt | 72.3 +- 1.7 | 3 |" in problems[0]


def test_update_rewrites_only_the_block(tmp_path: Path) -> None:
    md = _fixture(tmp_path, "| old | table |\n|---|---|\n| x | 1.0 |\n| y | 2.0 |")
    before = md.read_text()
    assert update_markdown(md, RENDERERS)
    after = md.read_text()
    assert check_markdown(md, RENDERERS) == []
    assert after.startswith("# Results\n\nProse 1.5 stays.\n\n<!-- table: auroc res/auroc.json")
    assert after.endswith("<!-- /table -->\n\nAfter the table.\n")
    assert FRESH in after and "| old | table |" in before and "| old |" not in after
    md.write_text(before.replace("| old | table |\n|---|---|\n| x | 1.0 |\n| y | 2.0 |\n", ""))
    assert update_markdown(md, RENDERERS)  # an empty block is filled
    assert check_markdown(md, RENDERERS) == []


def test_plumbing_header(tmp_path: Path) -> None:
    assert plumbing_title("T", True) == "Plumbing check: not a result. T"
    assert plumbing_title("T", False) == "T"
    md = _fixture(tmp_path, FRESH)
    (tmp_path / "res" / "auroc.json").write_text(json.dumps({**DATA, "plumbing": True}))
    assert check_markdown(md, RENDERERS)  # the header is part of the table
    update_markdown(md, RENDERERS)
    assert PLUMBING.capitalize() in md.read_text()


def test_marker_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="line 1: table block `a` is not closed"):
        find_blocks("<!-- table: a x.json -->\n| t |")
    with pytest.raises(ValueError, match="line 2: table marker inside the block opened at 1"):
        find_blocks("<!-- table: a x.json -->\n<!-- table: b y.json -->\n<!-- /table -->")
    with pytest.raises(ValueError, match="line 1: `<!-- /table -->` without an opening"):
        find_blocks("<!-- /table -->")
    md = _fixture(tmp_path, FRESH)
    with pytest.raises(ValueError, match="unknown table renderer 'auroc'"):
        check_markdown(md, {})
    (tmp_path / "res" / "auroc.json").unlink()
    with pytest.raises(FileNotFoundError, match="auroc.json` does not exist"):
        check_markdown(md, RENDERERS)


def test_markdown_table_shape_checked() -> None:
    assert markdown_table(["a|b"], [["1"]]) == "| a\\|b |\n|---|\n| 1 |"
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [["1"]])
    with pytest.raises(ValueError, match="`header` is empty"):
        markdown_table([], [])


def test_unbacked_numbers() -> None:
    data = {"a": [0.7504, {"b": 1.62}], "flag": True, "c": float("nan"), "s": "x"}
    assert json_numbers(data) == [0.7504, 1.62]
    text = "AUROC 75.0 (x100), 0.750 raw, 1.62x cost, 1.6x rounded, seeds 0-9, v1b, 74.5 stale."
    assert unbacked_numbers(text, data, scales=(1, 100)) == ["74.5"]
    assert unbacked_numbers(text, data, scales=(1,)) == ["75.0", "74.5"]
    assert unbacked_numbers("seeds 3/3", data, integers=True) == ["3", "3"]
    assert unbacked_numbers("-0.75 and [-1.6, +1.62]", {"v": -0.75, "w": -1.62, "z": 1.62}) == []
