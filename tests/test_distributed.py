"""Data-parallel meta-pretraining under torchrun (gloo, 2 CPU processes) equals one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


def _run(nproc: int, out: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(WORKER), str(out), *extra]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _assert_same(a: dict, b: dict, rtol: float) -> None:
    for name in ("pt_params", "ft_head", "hparams"):
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("float64", 1e-12)])
def test_two_processes_equal_one_process_on_the_union_of_shards(tmp_path, dtype, rtol):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    r1 = _run(1, one, "--dtype", dtype)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _run(2, two, "--dtype", dtype)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert (a["world"], b["world"]) == (1, 2)
    _assert_same(a, b, rtol)
    assert not torch.equal(a["hparams"]["phi"], torch.zeros(6, dtype=getattr(torch, dtype)))


def test_a_dead_rank_fails_the_job_loudly_and_resume_reaches_the_same_result(tmp_path):
    ref, out, ckpt = tmp_path / "ref.pt", tmp_path / "out.pt", tmp_path / "ckpt.pt"
    assert _run(2, ref, "--steps", "5").returncode == 0
    dead = _run(2, out, "--steps", "5", "--ckpt", str(ckpt), "--die-at", "3", timeout=180)
    assert dead.returncode != 0 and not out.exists()
    assert torch.load(ckpt, weights_only=False)["meta_steps_done"] >= 2
    resumed = _run(2, out, "--steps", "5", "--ckpt", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(torch.load(ref, weights_only=False), torch.load(out, weights_only=False), 1e-6)
