"""Tables in RESULTS.md generated from the committed JSON next to them, and checked against it.

A generated table sits between two markers that name its renderer and its JSON (a path
relative to the markdown file):

    <!-- table: ppi_main results/ppi.json -->
    | method | ... |
    <!-- /table -->

``check_markdown`` re-renders every block from its JSON and reports each block whose text
differs (a stale table); ``update_markdown`` rewrites the blocks in place (run after the command
that wrote the JSON). Renderers are pure functions ``json data -> markdown``, registered by the
task. Tables that are not generated can still be held to the JSON: ``unbacked_numbers`` lists
every decimal number of a text that no JSON number (times a scale, e.g. 100 for AUROC x 100)
rounds to.

>>> md = "<!-- table: demo r.json -->\\n| a |\\n|---|\\n| 1.0 |\\n<!-- /table -->\\n"
>>> [b.name for b in find_blocks(md)]
['demo']
>>> markdown_table(["a", "b"], [["1", "2"]])
'| a | b |\\n|---|---|\\n| 1 | 2 |'
>>> unbacked_numbers("AUROC 75.0 +- 0.3, ratio 2.5", {"m": 0.75, "s": 0.003}, scales=(1, 100))
['2.5']
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PLUMBING",
    "Renderer",
    "Block",
    "markdown_table",
    "plumbing_title",
    "find_blocks",
    "render_blocks",
    "check_markdown",
    "update_markdown",
    "json_numbers",
    "unbacked_numbers",
]

PLUMBING = "plumbing check: not a result"
Renderer = Callable[[Any], str]

_OPEN = re.compile(r"^<!-- table: (?P<name>[\w.-]+) (?P<src>\S+) -->$")
_CLOSE = "<!-- /table -->"
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?!\.?\d)")


@dataclass(frozen=True)
class Block:
    """A generated table: renderer ``name``, JSON ``src``, current ``body`` (the ``n_lines``
    lines between the markers) and the 1-based line of its opening marker."""

    name: str
    src: str
    body: str
    line: int
    n_lines: int


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    """A markdown table (no trailing newline); cells are ``str()``-ed, ``|`` escaped."""
    head = [str(h) for h in header]
    if not head:
        raise ValueError("`header` is empty: a table needs at least one column")

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [line(head), "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [str(c) for c in r]
        if len(cells) != len(head):
            raise ValueError(f"row {i} has {len(cells)} cells for {len(head)} columns: {cells}")
        out.append(line(cells))
    return "\n".join(out)


def plumbing_title(title: str, plumbing: bool) -> str:
    """``title``, prefixed with ``PLUMBING`` for smoke / plumbing configs (table headers and
    plot titles alike)."""
    return f"{PLUMBING.capitalize()}. {title}" if plumbing else title


def find_blocks(text: str) -> list[Block]:
    """The generated blocks of a markdown text; unclosed or nested markers raise ValueError."""
    blocks: list[Block] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i].strip())
        if m is None:
            if lines[i].strip() == _CLOSE:
                raise ValueError(f"line {i + 1}: `{_CLOSE}` without an opening table marker")
            i += 1
            continue
        for j in range(i + 1, len(lines)):
            s = lines[j].strip()
            if s == _CLOSE:
                break
            if _OPEN.match(s):
                raise ValueError(f"line {j + 1}: table marker inside the block opened at {i + 1}")
        else:
            raise ValueError(f"line {i + 1}: table block `{m['name']}` is not closed ({_CLOSE})")
        body = lines[i + 1 : j]
        blocks.append(Block(m["name"], m["src"], "\n".join(body), i + 1, len(body)))
        i = j + 1
    return blocks


def _render(block: Block, base: Path, renderers: Mapping[str, Renderer]) -> str:
    if block.name not in renderers:
        raise ValueError(
            f"line {block.line}: unknown table renderer {block.name!r}; have {sorted(renderers)}"
        )
    src = base / block.src
    if not src.is_file():
        raise FileNotFoundError(f"line {block.line}: table JSON `{src}` does not exist")
    return renderers[block.name](json.loads(src.read_text())).rstrip("\n")


def render_blocks(path: str | Path, renderers: Mapping[str, Renderer]) -> list[tuple[Block, str]]:
    """Each block of the markdown file ``path`` with its text re-rendered from its JSON."""
    p = Path(path)
    return [(b, _render(b, p.parent, renderers)) for b in find_blocks(p.read_text())]


def check_markdown(path: str | Path, renderers: Mapping[str, Renderer]) -> list[str]:
    """One message (with a unified diff) per block whose text differs from its JSON's
    rendering; empty when every generated table is current."""
    problems = []
    for b, fresh in render_blocks(path, renderers):
        if b.body.rstrip("\n") != fresh:
            diff = "\n".join(
                difflib.unified_diff(
                    b.body.split("\n"), fresh.split("\n"), "RESULTS.md", b.src, lineterm=""
                )
            )
            problems.append(f"{path}:{b.line}: table `{b.name}` is stale against {b.src}:\n{diff}")
    return problems


def update_markdown(path: str | Path, renderers: Mapping[str, Renderer]) -> bool:
    """Rewrite every block of ``path`` from its JSON; True when the file changed."""
    p = Path(path)
    text = p.read_text()
    lines = text.split("\n")
    for b, fresh in reversed(render_blocks(p, renderers)):  # bottom-up keeps line numbers
        lines[b.line : b.line + b.n_lines] = fresh.split("\n")
    new = "\n".join(lines)
    if new != text:
        p.write_text(new)
    return new != text


def json_numbers(data: Any) -> list[float]:
    """Every finite number (not bool) in a JSON value, depth first."""
    if isinstance(data, bool):
        return []
    if isinstance(data, (int, float)):
        return [float(data)] if math.isfinite(data) else []
    if isinstance(data, Mapping):
        return [x for v in data.values() for x in json_numbers(v)]
    if isinstance(data, (list, tuple)):
        return [x for v in data for x in json_numbers(v)]
    return []


def unbacked_numbers(
    text: str, data: Any, scales: Iterable[float] = (1.0,), integers: bool = False
) -> list[str]:
    """Decimal numbers of ``text`` that no JSON number times a scale rounds to (at the number's
    printed decimals). Integers (seed counts, seeds, sizes) are skipped unless ``integers``."""
    values = json_numbers(data)
    scs = list(scales)
    out = []
    for tok in _NUMBER.findall(text):
        decimals = len(tok.split(".")[1]) if "." in tok else 0
        if decimals == 0 and not integers:
            continue
        x = float(tok)
        tol = 0.5 * 10.0**-decimals + 1e-9 * max(1.0, abs(x))
        if not any(abs(c * v - x) <= tol for v in values for c in scs):
            out.append(tok)
    return out
