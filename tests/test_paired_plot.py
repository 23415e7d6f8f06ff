"""tasks.paired_plot: the per-seed paired-difference plot of a results JSON."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from tasks.paired_plot import main, plot_paired, select
from tasks.paired_table import paired_spec

SPEC = paired_spec(
    "AUROC",
    {
        "a": {0: 0.70, 1: 0.72, 2: 0.71},
        "b": {0: 0.71, 1: 0.74, 2: 0.70},
        "c": {0: 0.60, 1: 0.61, 2: 0.62},
    },
    ["a", "c"],
    scale=100,
)


def test_select_walks_a_dotted_path_and_names_the_missing_key() -> None:
    data = {"tables": {"full": SPEC}}
    assert select(data, "tables.full") is SPEC
    with pytest.raises(KeyError, match="no key 'partial'"):
        select(data, "tables.partial")
    with pytest.raises(KeyError, match="not a paired table"):
        select(data, "tables")


def test_writes_a_png_of_every_compared_method(tmp_path: Path) -> None:
    path = plot_paired(SPEC, tmp_path / "sub" / "p.png")
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_a_spec_with_only_baselines_is_refused(tmp_path: Path) -> None:
    only = paired_spec("AUROC", {"a": {0: 0.7, 1: 0.8}}, ["a"])
    with pytest.raises(ValueError, match="no method besides its baselines"):
        plot_paired(only, tmp_path / "p.png")


def test_cli_reads_the_json_and_rejects_a_bad_table(tmp_path: Path) -> None:
    src = tmp_path / "r.json"
    src.write_text(json.dumps({"tables": {"full": SPEC}}))
    main([str(src), "--table", "tables.full", "--out", str(tmp_path / "o.png")])
    assert (tmp_path / "o.png").exists()
    with pytest.raises(SystemExit):
        main([str(src), "--table", "tables.nope", "--out", str(tmp_path / "x.png")])
