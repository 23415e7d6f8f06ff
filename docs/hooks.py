"""MkDocs hooks: render the repository's own result files into the site instead of copying them.

``INCLUDE`` maps a markdown file of the repository to its place in the site; the files it links
to with relative links (plots, JSON) come along at the same relative place, so its links work
unchanged, and links between included files point at each other's place in the site.
``ASSETS`` adds files that the hand-written pages link to. A page can also embed one
section of a repository file with

    <!-- include-section benchmarks/RESULTS.md "Heading text" -->

which is replaced by that section (from the heading to the next heading of the same or a
higher level); its relative links are rewritten to point at the included copy. Nothing is
duplicated in docs/, so the site shows what the files say at build time.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]

INCLUDE = {
    "benchmarks/RESULTS.md": "benchmarks/results.md",
    "tasks/synthetic/RESULTS.md": "reproductions/synthetic/index.md",
    "tasks/synthetic/HISTORY.md": "reproductions/synthetic/HISTORY.md",
    "tasks/ppi/RESULTS.md": "reproductions/ppi/index.md",
    "tasks/ppi/HISTORY.md": "reproductions/ppi/HISTORY.md",
    "tasks/ecg/RESULTS.md": "reproductions/ecg/index.md",
    "tasks/ecg/HISTORY.md": "reproductions/ecg/HISTORY.md",
    "CHANGELOG.md": "changelog.md",
}
ASSETS = ["benchmarks/results/solver_study.png"]

_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
_SECTION = re.compile(r'<!-- include-section (\S+) "([^"]+)" -->')


def _relative_targets(text: str) -> list[str]:
    out = []
    for m in _LINK.finditer(text):
        target = m.group(2).split("#")[0]
        if target and not re.match(r"[a-z]+:", target) and not target.startswith("/"):
            out.append(target)
    return out


def _dest(src: str) -> str:
    """Where a repository file appears in the site."""
    if src in INCLUDE:
        return INCLUDE[src]
    for md, dest in INCLUDE.items():
        src_dir, dest_dir = posixpath.dirname(md), posixpath.dirname(dest)
        if src_dir and src.startswith(src_dir + "/"):
            return posixpath.join(dest_dir, posixpath.relpath(src, src_dir))
    return src


def _relink_included(src: str, text: str) -> str:
    """``text`` of the included ``src`` with its relative links to other included markdown files
    rewritten to those files' places in the site (RESULTS.md -> index.md, say)."""
    dest_dir = posixpath.dirname(INCLUDE[src])

    def relink(link: re.Match) -> str:
        target, _, anchor = link.group(2).partition("#")
        repo = posixpath.normpath(posixpath.join(posixpath.dirname(src), target))
        if not target or repo not in INCLUDE or re.match(r"[a-z]+:", target):
            return link.group(0)
        new = posixpath.relpath(INCLUDE[repo], dest_dir) + (f"#{anchor}" if anchor else "")
        return link.group(1) + new + link.group(3)

    return _LINK.sub(relink, text)


def on_files(files: Files, config) -> Files:
    added: set[str] = set()

    def add(src: str, content: str | None = None) -> None:
        dest = _dest(src)
        if dest in added or files.get_file_from_path(dest) is not None:
            return
        added.add(dest)
        if content is not None:
            files.append(File.generated(config, dest, content=content))
        else:
            files.append(File.generated(config, dest, abs_src_path=str(ROOT / src)))

    for src in INCLUDE:
        text = (ROOT / src).read_text()
        for target in _relative_targets(text):
            linked = posixpath.normpath(posixpath.join(posixpath.dirname(src), target))
            if (ROOT / linked).is_file() and not linked.endswith(".md"):
                add(linked)
        add(src, content=_relink_included(src, text))
    for src in ASSETS:
        add(src)
    return files


def _section(src: str, heading: str) -> str:
    lines = (ROOT / src).read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"(#+)\s+(.*)", line)
        if m and m.group(2).strip() == heading:
            level = len(m.group(1))
            end = len(lines)
            for j in range(i + 1, len(lines)):
                n = re.match(r"(#+)\s", lines[j])
                if n and len(n.group(1)) <= level:
                    end = j
                    break
            return "\n".join(lines[i + 1 : end]).strip()
    raise ValueError(f"include-section: no heading {heading!r} in {src}")


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    page_dir = posixpath.dirname(page.file.src_uri)

    def embed(m: re.Match) -> str:
        src, heading = m.group(1), m.group(2)
        body = _section(src, heading)

        def relink(link: re.Match) -> str:
            target = link.group(2)
            if re.match(r"[a-z]+:", target) or target.startswith(("#", "/")):
                return link.group(0)
            repo = posixpath.normpath(posixpath.join(posixpath.dirname(src), target))
            new = posixpath.relpath(_dest(repo), page_dir or ".")
            return link.group(1) + new + link.group(3)

        return _LINK.sub(relink, body)

    return _SECTION.sub(embed, markdown)
