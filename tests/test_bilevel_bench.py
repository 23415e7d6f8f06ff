"""benchmarks/bilevel: problems as BenchOpt specifies them, exact metrics, agreement across
libraries, the real-data readers on tiny files in the real formats, and a smoke run.

References come from outside the code under test: BenchOpt's dense formulas written out
here, ``torch.func.hessian``, dense solves, and the peers (torchopt, higher).
"""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchopt")
pytest.importorskip("higher")

from benchmarks.bilevel import check, data  # noqa: E402
from benchmarks.bilevel import metrics as M  # noqa: E402
from benchmarks.bilevel.methods import hypergrad_methods  # noqa: E402
from benchmarks.bilevel.peers import peer_methods  # noqa: E402
from benchmarks.bilevel.problems import PROBLEMS, gen_matrices, make_problem, quad_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torchopt's functorch.vjp
F64 = torch.float64


@pytest.fixture(scope="module")
def tiny64():
    return {name: make_problem(name, size="tiny", dtype=F64) for name in PROBLEMS}


def test_quadratic_equals_benchopts_dense_formula():
    """The factored loss is BenchOpt's ``quadratic`` averaged over the samples, with the
    per-sample matrices ``X.T @ X`` that ``gen_matrices`` builds written out densely."""
    gen = torch.Generator().manual_seed(0)
    t = gen_matrices(7, 6, 3, 1.0, 1.0, 0.1, 0.1, gen)
    z, x = torch.randn(6, dtype=F64), torch.randn(3, dtype=F64)
    dense = []
    for i in range(7):
        A, B = torch.outer(t["a"][i], t["a"][i]), torch.outer(t["w"][i], t["w"][i])
        C = torch.outer(t["c"][i], t["b"][i])  # cross_i = X1 @ X2: (d_out, d_in)
        dense.append(0.5 * z @ A @ z + 0.5 * x @ B @ x + x @ C @ z + t["l"][i] @ z + t["m"][i] @ x)
    torch.testing.assert_close(quad_loss(t)(z, x), torch.stack(dense).mean())


def test_quadratic_spectra_follow_the_spec():
    """E[A_i] has spectrum [mu, L]; the outer block has one zero eigenvalue; the cross term's
    singular values run from mu to L_cross (sample means, so to within sampling error)."""
    P = make_problem("quadratic", size="quick", dtype=F64)
    e = torch.linalg.eigvalsh(P.tensors["in_Hzz"])
    assert 0.07 < float(e.min()) < 0.13 and 0.8 < float(e.max()) < 1.3
    eo = torch.linalg.eigvalsh(P.tensors["out_Hxx"])
    assert float(eo.min()) < 1e-10
    assert P.info["value_hessian_min_eig"] >= 1e-12
    assert P.n_inner == 4096 and P.theta0.numel() == 100 and P.h0.numel() == 10


def test_quadratic_exact_metric_against_autograd_and_dense_hessian(tiny64):
    P = tiny64["quadratic"]
    h = torch.randn(P.h0.shape, dtype=F64)
    theta, g = M.hypergradient(P, h)
    gt = torch.func.grad(lambda t: P.inner(t, h))(theta)
    assert float(gt.norm()) < 1e-10  # theta* is stationary
    H = torch.func.hessian(lambda t: P.inner(t, h))(theta)
    t = theta.clone().requires_grad_(True)
    hh = h.clone().requires_grad_(True)
    gLt, gLh = torch.autograd.grad(P.outer(t, hh), (t, hh))
    v = torch.linalg.solve(H, gLt)
    gf = torch.autograd.grad(P.inner(t, hh), t, create_graph=True)[0]
    ref = gLh - torch.autograd.grad(gf @ v, hh)[0]
    torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["ijcnn1", "breast_cancer", "covtype", "datacleaning"])
def test_dense_hessian_matches_torch_func(tiny64, name):
    P = tiny64[name]
    gen = torch.Generator().manual_seed(1)
    theta = P.theta0 + 0.1 * torch.randn(P.theta0.shape, generator=gen, dtype=F64)
    h = P.h0 + 0.3 * torch.randn(P.h0.shape, generator=gen, dtype=F64)
    ref = torch.func.hessian(lambda t: P.inner(t, h))(theta)
    torch.testing.assert_close(M.dense_hessian(P, theta, h), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", PROBLEMS)
def test_hypergradient_agrees_across_libraries(tiny64, name):
    """Dense float64 reference vs hypergrad (CG), torchopt (custom_root + CG) and higher
    (an unroll from theta* long enough to converge), before any timing."""
    a = check.agreement(tiny64[name])
    assert a["hypergrad"] < 1e-9 and a["torchopt"] < 1e-9
    assert a["higher"] < 1e-8 and a["higher_truncation_bound"] <= 1e-10


def test_corruption_mask_is_the_changed_labels():
    rng = np.random.RandomState(0)
    y = rng.randint(0, 10, 2000)
    noisy, changed = data.corrupt(y, 0.5, rng)
    assert np.array_equal(changed, noisy != y)
    assert 0.40 < changed.mean() < 0.50  # 0.5 redrawn, a tenth of those to the same class


def _write_libsvm(path: Path, X: np.ndarray, y: np.ndarray) -> None:
    lines = []
    for xi, yi in zip(X, y):
        feats = " ".join(f"{j + 1}:{v:.6g}" for j, v in enumerate(xi) if v != 0)
        lines.append(f"{yi:g} {feats}")
    path.write_text("\n".join(lines) + "\n")


def _write_idx(path: Path, arr: np.ndarray) -> None:
    if arr.ndim == 1:
        head = struct.pack(">ii", 2049, len(arr))
    else:
        head = struct.pack(">iiii", 2051, arr.shape[0], 28, 28)
    raw = head + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def test_readers_on_files_in_the_real_formats(tmp_path):
    rng = np.random.RandomState(0)
    X = np.round(rng.randn(40, 22), 3) * (rng.rand(40, 22) < 0.5)
    y = np.where(rng.rand(40) < 0.3, 1.0, -1.0)
    _write_libsvm(tmp_path / "ijcnn1", X, y)
    _write_libsvm(tmp_path / "ijcnn1.t", X[:20], y[:20])
    Xr, yr = data.read_libsvm(tmp_path / "ijcnn1", 22)
    np.testing.assert_allclose(Xr, X, atol=1e-6)
    np.testing.assert_array_equal(yr, y)
    P = make_problem("ijcnn1", data_dir=str(tmp_path), dtype=F64)
    assert P.substitute == "" and P.n_inner == 40 and P.theta0.numel() == 22

    Xc = np.round(rng.rand(60, 54), 3)
    yc = rng.randint(1, 8, 60)
    _write_libsvm(tmp_path / "covtype.scale", Xc, yc)
    P = make_problem("covtype", data_dir=str(tmp_path), dtype=F64)
    assert P.substitute == "" and P.h0.numel() == int(yc.max())  # labels 1..7 -> 0..6

    imgs = rng.randint(0, 256, (50, 784))
    labels = rng.randint(0, 10, 50)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs[:10])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:10])
    np.testing.assert_array_equal(data.read_idx(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "t10k-labels-idx1-ubyte"), labels[:10])
    P = make_problem("datacleaning", data_dir=str(tmp_path), dtype=F64)
    assert P.substitute == "" and P.n_inner == 40 and P.n_outer == 10
    assert P.theta0.numel() == 784 * 10 and P.h0.numel() == 40


def test_idx_reader_rejects_a_bad_magic(tmp_path):
    (tmp_path / "bad").write_bytes(struct.pack(">ii", 1234, 0))
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(tmp_path / "bad")


@pytest.mark.parametrize("name", ["quadratic", "datacleaning"])
def test_every_method_steps_and_counts(name):
    P = make_problem(name, size="tiny")
    for m in hypergrad_methods() + peer_methods():
        s = m.init(P, 0)
        for _ in range(2):
            m.step(P, s)
        c = s.counts()
        assert torch.isfinite(s.h).all() and torch.isfinite(s.theta).all(), m.name
        assert c["steps"] == 2 and c["grads"] > 0 and c["grad_equivalents"] >= c["grads"]
        assert not torch.equal(s.h, P.h0), m.name


def test_deterministic_loop_converges_on_the_quadratic():
    """The amortised loop drives ||grad h||^2 down by orders of magnitude (exact metric)."""
    P = make_problem("quadratic", size="tiny")
    P64 = make_problem("quadratic", size="tiny", dtype=F64)
    ev = M.Evaluator(P64)
    m = next(m for m in hypergrad_methods() if m.name == "amortized")
    s = m.init(P, 0)
    v0 = ev(s.theta, s.h)["value"]
    for _ in range(300):
        m.step(P, s)
    assert ev(s.theta, s.h)["value"] < 1e-6 * v0


def test_warm_start_study_counts_fewer_products_at_equal_error(tiny64):
    r = check.warm_start_study(tiny64["quadratic"], steps=15)
    assert all(row["err_cold"] <= row["err_warm"] or row["capped"] for row in r["rows"])
    assert r["hvps_per_step_warm"] <= 3.0 + 1e-12  # J_warm = 2 steps + the start residual


def test_smoke_cli_tiny(tmp_path):
    """``python -m benchmarks.bilevel --tiny``: every method on two problems, report + JSON."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bilevel",
        "--tiny",
        "--seeds",
        "1",
        "--budget",
        "0.05",
        "--evals",
        "2",
        "--warm-steps",
        "2",
        "--problems",
        "quadratic",
        "datacleaning",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    res = json.loads((tmp_path / "bilevel_tiny.json").read_text())
    assert set(res["problems"]) == {"quadratic", "datacleaning"}
    runs = res["problems"]["quadratic"]["runs"]
    assert len(runs) == len(hypergrad_methods() + peer_methods())
    assert all(len(r["records"]) >= 2 and not r["diverged"] for r in runs)
    assert (tmp_path / "quadratic_tiny.png").stat().st_size > 0
    text = (tmp_path / "report_tiny.md").read_text()
    assert "## Targets" in text and "AUROC" in text
