"""The package is releasable: metadata in one place, and a wheel that installs and imports.

The wheel is built with ``python -m build --no-isolation`` (offline: it uses the setuptools
installed here) from a copy of only what the build needs, installed into a fresh virtual
environment with ``--no-deps --no-index``, and imported from a directory outside the
repository so the working tree cannot shadow it. The venv sees the system site-packages only
for torch (installing a second multi-GB torch would not test our package).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

import hypergrad

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DIST = PYPROJECT["project"]["name"]

SMOKE = """
import importlib.metadata as md, pathlib, sys
import torch
import hypergrad as hg
from hypergrad import distributed, solvers, testing, tree
assert pathlib.Path(hg.__file__).resolve().is_relative_to(pathlib.Path(sys.prefix).resolve()), (
    hg.__file__, sys.prefix)
assert md.version({dist!r}) == hg.__version__, (md.version({dist!r}), hg.__version__)
assert (pathlib.Path(hg.__file__).parent / "py.typed").is_file()
f = lambda p, h: 0.5 * ((p - h) ** 2).sum()
L = lambda p, h: (p ** 2).sum()
h = torch.tensor([3.0], dtype=torch.float64)
g = hg.implicit_grad(f, L, h.clone(), h)
assert torch.allclose(g, 2 * h), g
print("smoke ok", hg.__version__)
"""


def test_one_version_and_the_release_files():
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert "version" not in PYPROJECT["project"]
    dyn = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert dyn == {"attr": "hypergrad.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", hypergrad.__version__)
    cff = (ROOT / "CITATION.cff").read_text()
    assert f'version: "{hypergrad.__version__}"' in cff  # keep the citation in step
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert f"## [{hypergrad.__version__}]" in changelog
    assert (ROOT / "hypergrad" / "py.typed").is_file()
    # `hypergrad` on the package index is an unrelated project
    assert DIST != "hypergrad"


@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="`build` not installed")
def test_wheel_installs_into_a_fresh_venv_and_imports(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "hypergrad", src / "hypergrad",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    assert len(list(out.glob("*.tar.gz"))) == 1  # the sdist builds too
    names = zipfile.ZipFile(wheels[0]).namelist()
    # every module of the library ships (a flat `packages = ["hypergrad"]` dropped subpackages)
    expected = {p.relative_to(ROOT).as_posix()
                for p in (ROOT / "hypergrad").rglob("*.py") if "__pycache__" not in p.parts}
    assert expected <= set(names), sorted(expected - set(names))
    assert "hypergrad/py.typed" in names
    assert not [n for n in names if n.split("/")[0] in ("tests", "tasks", "models", "benchmarks")]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    py = venv / "bin" / "python"
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
         str(wheels[0])],
        capture_output=True, text=True,
    )
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    run = tmp_path / "elsewhere"
    run.mkdir()
    smoke = subprocess.run(
        [str(py), "-I", "-c", SMOKE.format(dist=DIST)], cwd=run, capture_output=True, text=True,
    )
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert f"smoke ok {hypergrad.__version__}" in smoke.stdout


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")
def test_mypy_is_clean_on_the_library():
    import tempfile

    cache = Path(tempfile.gettempdir()) / "hypergrad-mypy-cache"  # outside the repository
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache)],  # files: [tool.mypy]
        cwd=ROOT, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
