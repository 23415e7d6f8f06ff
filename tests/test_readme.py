"""The README's quickstart runs verbatim and does what it says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_verbatim_and_lowers_validation_loss():
    code = _block("Quickstart")
    assert len(code.strip().splitlines()) <= 30
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README-quickstart", "exec"), {"__name__": "__readme__"})
    before = float(re.search(r"before: ([\d.]+)", out.getvalue()).group(1))
    after = float(re.search(r"after:\s+([\d.]+)", out.getvalue()).group(1))
    assert after < before
    # the numbers quoted in the README are the ones the code prints
    assert f"{before:.4f} before and {after:.4f} after" in README.read_text()


def test_readme_setup_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = re.search(r"Run the tests.*?```bash\n(.*?)\n```", text, re.S).group(1)
    assert test_cmd in ci


def test_readme_links_point_at_files_that_exist():
    """The README is mostly links into the docs and examples: each relative one must resolve
    (and its #anchor, for a markdown page, name a heading there)."""
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) >= 10
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = README.parent / path
        assert target.exists(), link
        if anchor and target.suffix == ".md":
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                     for h in re.findall(r"^#+\s+(.*)$", target.read_text(), re.M)}
            assert anchor in slugs, link
