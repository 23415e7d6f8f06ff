"""Every script in examples/ runs at its tiny size, prints a result, and saves a plot and JSON.

Each example is a standalone program (``python examples/<name>.py``); the suite runs it as one
in a subprocess, from the repository root, with ``--tiny --out <tmp>``. Its docstring must say
which primitive it shows and why that one. The default sizes (at most 5 CPU-minutes each) are
run by hand; their results and wall times are quoted in docs/examples.md.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hypergrad

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
GALLERY = {"per_feature_l2", "hyper_cleaning", "dataset_distillation", "imaml_digits",
           "deq_fixed_point", "optimizer_hyperparams"}
# Library functions that other branches are adding; an example that calls one of them is
# skipped (with the name) until it exists. Any other missing `hg.` name is a failure.
PENDING = {"fixed_point_solution", "fixed_point_grad", "forward_hypergrad", "implicit_jvp",
           "implicit_jacobian"}


def test_the_gallery_is_complete():
    missing = GALLERY - {p.stem for p in EXAMPLES}
    assert not missing, sorted(missing)


# examples/transformer_reweighting.py is the fd helper's; its docstring explains its primitive
# in prose. Until it carries the "Primitive:" / "Why" lines of the gallery, that one check is
# an expected failure rather than a red suite.
_LABELS_PENDING = {"transformer_reweighting"}


@pytest.mark.parametrize("script", [
    pytest.param(p, marks=pytest.mark.xfail(
        reason="fd: add 'Primitive: ...' and 'Why this one: ...' to the docstring", strict=False))
    if p.stem in _LABELS_PENDING else p for p in EXAMPLES], ids=lambda p: p.stem)
def test_docstring_names_the_primitive_and_why(script):
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    assert "Primitive:" in doc and "Why" in doc, f"{script.name}: say which primitive and why"
    assert "--tiny" in script.read_text()


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_at_tiny_size(script, tmp_path):
    missing = sorted({n for n in re.findall(r"\bhg\.(\w+)", script.read_text())
                      if not hasattr(hypergrad, n)})
    if missing and set(missing) <= PENDING:
        pytest.skip(f"needs hg.{', hg.'.join(missing)} (not in this hypergrad yet)")
    assert not missing, f"{script.name} calls hg.{missing}, which hypergrad does not have"
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, str(script), "--tiny", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.strip(), "an example prints its result"
    assert list(tmp_path.glob("*.png")), "an example saves a plot"
    jsons = list(tmp_path.glob("*.json"))
    assert jsons, "an example saves its numbers as JSON"
    for j in jsons:
        json.loads(j.read_text())
