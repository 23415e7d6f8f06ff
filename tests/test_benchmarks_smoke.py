"""Every benchmark runs once on a tiny problem (no timing, no performance assertion).

1. ``pytest benchmarks --benchmark-disable`` with ``HYPERGRAD_BENCH_SIZE=tiny`` in a subprocess:
   each pytest-benchmark test calls its function once, including the float64 agreement checks
   between hypergrad, torchopt and higher that precede the timings.
2. ``benchmarks.report --tiny``: every section of the report (products, IFT, accuracy vs a dense
   Hessian, unroll, peak memory in fresh processes), its table, plots and JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("torchopt")
pytest.importorskip("higher")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")  # fitted tiny problems, shared by both tests


@pytest.fixture
def tiny_env(cache_dir, monkeypatch):
    monkeypatch.setenv("HYPERGRAD_BENCH_SIZE", "tiny")
    monkeypatch.setenv("HYPERGRAD_BENCH_CACHE", str(cache_dir))
    return dict(os.environ)


def test_every_pytest_benchmark_runs_once(tiny_env):
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "--benchmark-disable",
         "-p", "no:cacheprovider", "-x"],
        cwd=ROOT, env=tiny_env, capture_output=True, text=True, timeout=300,
    )
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    assert " passed" in out.stdout and "failed" not in out.stdout, tail


def test_report_runs_on_tiny_sizes(tiny_env, tmp_path, capsys):
    from benchmarks import report

    data = report.main(["--tiny", "--quiet", "--out", str(tmp_path / "out")])
    table = capsys.readouterr().out
    assert table.startswith("| group | problem | method |")
    groups = {r["group"] for r in data["rows"]}
    assert groups == {"products", "implicit", "accuracy", "unroll", "memory"}
    for name in ("table.md", "results.json", "time_vs_J.png", "memory_vs_T.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["memory"][0]["measure"] in ("VmHWM-after-clear_refs", "ru_maxrss")


def test_forward_mode_study_runs_on_tiny_sizes(tmp_path, capsys):
    from benchmarks import forward_mode

    data = forward_mode.main(["--tiny", "--quiet", "--out", str(tmp_path)])
    assert max(data["forward"]["agreement_f64"].values()) < 1e-10
    assert all(max(r["rel_err_vs_dense"].values()) < 1e-8 for r in data["jacobian"].values())
    assert data["forward"]["memory_kib"]
    assert (tmp_path / "forward_mode.png").stat().st_size > 0
    assert "implicit_jacobian" in forward_mode.section(tmp_path)
