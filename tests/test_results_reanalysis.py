"""The "Paired re-analysis (issue 20)" sections of the RESULTS.md files quote only numbers that
are in the committed study JSON they name (or, listed here, numbers quoted from the old tables
of the same file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.results_table import _NUMBER, json_numbers, unbacked_numbers

ROOT = Path(__file__).resolve().parents[1]
HEAD = "## Paired re-analysis (issue 20, in progress)"
CASES = {
    "tasks/ppi/RESULTS.md": (["studies/results/ppi_baselines/labels.json",
                              "studies/results/ppi_baselines/structure.json",
                              "studies/results/ppi_baselines/structure_tuning.json"], set()),
    # Meta-PT's old 5-seed numbers, quoted from this file's noisy-label table
    "tasks/synthetic/RESULTS.md": (["studies/results/noisy_small_loss.json"],
                                   {"0.976", "0.010", "23.6"}),
}


def _section(text: str) -> str:
    start = text.index(HEAD) + len(HEAD)
    end = text.find("\n## ", start)
    return text[start:] if end < 0 else text[start:end]


def _backing(paths: list[str]) -> list[float]:
    """Every number of the JSONs, plus those of their rendered ``markdown`` tables (written by
    the same study command from the same per-seed values)."""
    vals: list[float] = []
    for p in paths:
        data = json.loads((ROOT / p).read_text())
        vals += json_numbers(data)
        vals += [float(t) for t in _NUMBER.findall(data.get("markdown", ""))]
    return vals


@pytest.mark.parametrize("md", sorted(CASES))
def test_every_number_is_in_the_named_json(md: str) -> None:
    paths, quoted = CASES[md]
    text = _section((ROOT / md).read_text())
    for p in paths:
        assert p in text  # the JSON is named next to its numbers
    text = re.sub(r"`[^`]*`", "", text)  # commands and paths, not numbers
    bad = [t for t in unbacked_numbers(text, _backing(paths), scales=(1, 100)) if t not in quoted]
    assert bad == []
