"""Every number in the three RESULTS.md files comes from committed JSON written by a listed
command (issue 20, item 4).

For ``tasks/<task>/RESULTS.md``:

- each generated table (``<!-- table: <renderer> results/<name>.json -->`` ... ``<!-- /table -->``)
  re-renders from its JSON to exactly the text in the file;
- each such JSON records the ``command`` that wrote it, and that command is printed in the file;
- every decimal number of the prose (outside code, HTML comments and generated tables) is a
  number of one of the JSON files in ``tasks/<task>/results/`` (as is, or x 100 for AUROC in
  percent), at the number's printed precision.

Renderers: ``tasks.paired_table.RENDERERS`` plus each task's ``tasks.<task>.results_tables``
module, when it exists.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tasks.paired_table import RENDERERS as PAIRED
from tasks.results_table import check_markdown, find_blocks, unbacked_numbers

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("synthetic", "ppi", "ecg")


def _renderers() -> dict[str, Any]:
    out = dict(PAIRED)
    for task in TASKS:
        try:
            mod = importlib.import_module(f"tasks.{task}.results_tables")
        except ModuleNotFoundError as e:
            if e.name != f"tasks.{task}.results_tables":
                raise
            continue
        clash = set(out) & set(mod.RENDERERS)
        assert not clash, f"renderer names used twice: {sorted(clash)}"
        out.update(mod.RENDERERS)
    return out


def _prose(text: str) -> str:
    """The text with code fences, inline code, HTML comments and generated tables removed."""
    lines = text.split("\n")
    for b in reversed(find_blocks(text)):
        del lines[b.line - 1 : b.line + b.n_lines + 1]
    text = "\n".join(lines)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _code(text: str) -> str:
    """Everything inside code fences and inline code, with line continuations joined."""
    parts = re.findall(r"```.*?```", text, flags=re.S) + re.findall(r"`[^`\n]*`", text)
    return re.sub(r"\s*\\\n\s*", " ", "\n".join(parts))


@pytest.mark.parametrize("task", TASKS)
def test_generated_tables_match_their_json(task: str) -> None:
    md = ROOT / "tasks" / task / "RESULTS.md"
    blocks = find_blocks(md.read_text())
    assert blocks, f"{md} has no generated table"
    assert check_markdown(md, _renderers()) == []


@pytest.mark.parametrize("task", TASKS)
def test_each_table_json_names_a_command_printed_in_the_file(task: str) -> None:
    md = ROOT / "tasks" / task / "RESULTS.md"
    text = md.read_text()
    code = re.sub(r"\s+", " ", _code(text))
    for b in find_blocks(text):
        data = json.loads((md.parent / b.src).read_text())
        cmd = data.get("command")
        assert isinstance(cmd, str) and cmd, f"{b.src} records no `command`"
        assert re.sub(r"\s+", " ", cmd) in code, f"{b.src}'s command is not in {md.name}: {cmd}"


@pytest.mark.parametrize("task", TASKS)
def test_every_prose_number_is_in_the_results_json(task: str) -> None:
    md = ROOT / "tasks" / task / "RESULTS.md"
    files = sorted((md.parent / "results").glob("*.json"))
    assert files, f"no JSON in {md.parent / 'results'}"
    data = [json.loads(p.read_text()) for p in files]
    assert unbacked_numbers(_prose(md.read_text()), data, scales=(1, 100)) == []


def test_prose_check_can_fail() -> None:
    """The number check flags a decimal that no JSON holds and ignores code and tables."""
    text = "AUROC 75.0 and 71.3.\n`python -m x --lr 0.123`\n"
    assert unbacked_numbers(_prose(text), {"m": 0.75}, scales=(1, 100)) == ["71.3"]
