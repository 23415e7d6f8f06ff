"""The documentation cannot rot: the site builds strictly, its code runs, the docstrings' examples
pass, and it loads nothing from the internet.

Docstring examples and page snippets run as a reader runs them: with torch's own default dtype
(float32), not the float64 default that conftest.py sets for the rest of the suite.

Code blocks in docs/*.md fenced as ```python are executed, page by page in one namespace (in
order, so a block may use names from the blocks above it); blocks fenced as ```py are shown
but not run (JAX snippets, signatures).
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import importlib.util
import inspect
import io
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import hypergrad

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```",
                    re.S | re.M)


@pytest.fixture
def as_a_reader():
    """torch's default dtype, as in a fresh interpreter (conftest.py sets float64)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _modules() -> list[str]:
    names = [hypergrad.__name__]
    for info in pkgutil.walk_packages(hypergrad.__path__, prefix="hypergrad."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_pass(name, as_a_reader):
    """The API reference's examples (``>>>``) are doctests; each module's must pass."""
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    for test in finder.find(module, name):  # globals: a copy of the module's, as pytest does
        if test.lineno is None or test.filename != module.__file__:
            continue  # re-exported objects are tested in the module that defines them
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, out.getvalue()


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md"))


def _python_blocks(page: Path) -> list[str]:
    return [textwrap.dedent(m.group("body")) for m in _FENCE.finditer(page.read_text())
            if m.group("info").strip().split(" ")[0] == "python"]


@pytest.mark.parametrize("page", [p for p in _pages() if _python_blocks(p)],
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page, as_a_reader):
    ns: dict = {"__name__": f"docs_{page.stem}"}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchopt's functorch deprecations
        for i, code in enumerate(_python_blocks(page)):
            exec(compile(code, f"{page.relative_to(ROOT)}[block {i}]", "exec"), ns)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return out


def test_site_builds_strictly_with_every_page(site):
    for page in ("index", "getting-started", "concepts", "solvers", "migrating", "examples",
                 "api/implicit", "benchmarks/results", "reproductions/index",
                 "reproductions/synthetic/index", "reproductions/ppi/index",
                 "reproductions/ecg/index",
                 "changelog"):
        assert (site / f"{page}.html").is_file(), page
    api = (site / "api" / "implicit.html").read_text()
    assert 'id="hypergrad.implicit.implicit_grad"' in api  # generated from the docstrings
    assert (site / "search" / "search_index.json").is_file()


def _public_names() -> list[tuple[str, str]]:
    """(namespace, name) for hypergrad.__all__ and the __all__ of its public subpackages."""
    out = []
    for name in hypergrad.__all__:
        out.append(("hypergrad", name))
        obj = getattr(hypergrad, name)
        if inspect.ismodule(obj):
            out += [(obj.__name__, sub) for sub in obj.__all__]
    return out


def test_api_pages_cover_every_public_name(site):
    """Every public name has a generated entry (an anchor under its module) in the API
    reference, and every top-level one is listed in the overview's table."""
    anchors: set[str] = set()
    for html in (site / "api").glob("*.html"):
        anchors |= set(re.findall(r'id="(hypergrad[\w.]*)"', html.read_text()))
    overview = (DOCS / "api" / "index.md").read_text()
    missing, unlisted = [], []
    for namespace, name in _public_names():
        obj = getattr(importlib.import_module(namespace), name)
        if inspect.ismodule(obj):
            found = obj.__name__ in anchors
        else:  # documented where it is defined, or under the namespace that exports it
            home = getattr(obj, "__module__", None) or namespace
            found = any(a.endswith(f".{name}") and (a.startswith(f"{namespace}.")
                                                    or a.startswith(f"{home}."))
                        for a in anchors)
        if not found:
            missing.append(f"{namespace}.{name}")
        if namespace == "hypergrad" and not re.search(rf"`(hypergrad\.)?{name}\b", overview):
            unlisted.append(name)
    assert not missing, f"no API entry for {missing}: add it to a docs/api page (or a docstring)"
    assert not unlisted, f"not in the table of docs/api/index.md: {unlisted}"


def test_results_are_rendered_from_the_files_not_copies(site):
    """The benchmarks page and the solver tables show what benchmarks/RESULTS.md says now."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    row = next(line for line in results.splitlines() if line.startswith("| 5 | "))
    first_cell = row.split("|")[2].strip()
    assert first_cell in (site / "benchmarks" / "results.html").read_text()
    assert first_cell in (site / "solvers.html").read_text()
    for png in re.findall(r"\]\((results/[^)]+\.png)\)", results):
        assert (site / "benchmarks" / png).is_file(), png
    assert (site / "benchmarks" / "results" / "solver_study.png").is_file()


def _table(results: str, header_start: str) -> list[list[str]]:
    """The rows (cells) of the first markdown table in ``results`` whose header starts so."""
    lines = results.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _in_range(values: list[float], lo: float, hi: float, ndigits: int = 1) -> bool:
    """The range ``lo-hi``, as quoted to ``ndigits``, is exactly that of ``values``."""
    rounded = [round(v, ndigits) for v in values]
    return min(rounded) == lo and max(rounded) == hi


def test_numbers_quoted_in_the_pages_match_benchmarks_results():
    """Hand-written pages quote a few measured numbers; when benchmarks/RESULTS.md is
    regenerated and they change, this fails until the pages say the new numbers."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    page = {name: (DOCS / name).read_text() for name in
            ("concepts.md", "first-order.md", "distributed.md", "api/index.md")}

    jac = {r[0]: r for r in _table(results, "| hparams | mode (auto) | implicit_jacobian s")}
    assert jac["1 (scalar)"][6] == "667x" and "667x faster" in page["concepts.md"]
    assert jac["64 (feature)"][6] == "34x" and "34x for 64" in page["concepts.md"]

    fwd = _table(results, "| T | k | forward time / grad")
    unroll_mib = {(r[0], r[1]): r[6] for r in fwd}
    assert f"{unroll_mib[('1000', '1')]} MiB at T = 1000" in page["concepts.md"]
    for k, quoted in (("1", (1.5, 1.8, 1)), ("5", (2.9, 3.8, 1)), ("50", (17, 29, 0))):
        ratios = [float(r[4]) for r in fwd if r[1] == k]
        ratios += [float(x) for x in re.findall(rf"adam T=\d+ k={k}: forward / unroll = (\d+\.\d+)",
                                                 results)]
        assert _in_range(ratios, *quoted), (k, ratios)
        text = f"{quoted[0]:g}-{quoted[1]:g}x"  # as the page writes it
        assert text in page["concepts.md"], text

    matvec = [float(r[4]) for r in _table(results, "| group | problem | method | setting")
              if r[2] == "make_hvp matvec"]
    assert _in_range(matvec, 0.8, 1.6), matvec
    assert "0.8-1.6x" in page["concepts.md"] and "0.8-1.6x" in page["api/index.md"]

    fo = {r[0]: r for r in _table(results, "| problem | params | FD product / grad")}
    paired = [float(re.search(r"paired median ([\d.]+)", r[2]).group(1)) for r in fo.values()]
    assert _in_range(paired, 2.1, 2.4), paired
    assert "costs 2.1-2.4 gradients" in page["first-order.md"]
    assert "1.0000000, 1.4e-06" in fo["transformer"][8] and "to 1.4e-6" in page["first-order.md"]
    sama = [float(r[5]) for r in fo.values()]
    assert _in_range(sama, 0.06, 0.19, 2), sama
    assert "0.06-0.19x the time" in page["first-order.md"]

    mib = re.search(r"\| 2 \| [\d.]+ \| [\d.]+ \| (\d{3}\.\d+) \|", results).group(1)
    assert round(float(mib)) == 174 and "174 MiB" in page["distributed.md"]


def test_site_loads_nothing_from_the_internet(site):
    """No fonts, scripts or stylesheets from a CDN: the site works offline."""
    remote = re.compile(r"""(?:<script[^>]+src|<link[^>]+href|<img[^>]+src)=["']?(?:https?:)?//""")
    for html in site.rglob("*.html"):
        hits = remote.findall(html.read_text())
        assert not hits, (html, hits)
    for css in site.rglob("*.css"):
        assert "fonts.googleapis" not in css.read_text(), css


def test_links_between_included_files_point_at_their_place_in_the_site() -> None:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    rest = ", ![p](results/labels.png), [x](../../README.md)"
    out = hooks._relink_included("tasks/ppi/HISTORY.md", "[R](RESULTS.md#protocol)" + rest)
    assert out == "[R](index.md#protocol)" + rest
