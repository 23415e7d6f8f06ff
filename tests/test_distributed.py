"""Data-parallel meta-pretraining under torchrun (gloo, 2 CPU processes) equals one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


@pytest.mark.parametrize("extra", [("--bn", "sync"), ("--gather",)], ids=["sync_bn", "gather"])
def test_batch_coupled_losses_equal_one_process_with_sync_bn_and_all_gather(tmp_path, extra):
    """Batch statistics (SyncBatchNorm) and cross-example terms (all_gather) are global, and
    their second-order products too: float64, 2 processes == 1 process on the union."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for n, out in ((1, one), (2, two)):
        r = _run(n, out, "--dtype", "float64", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(torch.load(one, weights_only=False), torch.load(two, weights_only=False), 1e-12)


def test_sync_batchnorm_and_all_gather_match_one_process_to_second_order():
    """2 ranks vs one process on the whole batch, float64: SyncBatchNorm (2-D, 3-D and 4-D input,
    affine, momentum 0.1 / None / 0.3) forward, running statistics, gradient and Hessian-vector
    product; all_gather gradient and HVP; integer sums; bfloat16 statistics; unequal shapes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", str(ROOT / "tests" / "sync_bn_worker.py")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]


def test_a_process_group_left_alive_is_destroyed_at_exit():
    """init() registers an exit handler: a script that never calls shutdown() still destroys
    its gloo group while Python is alive (instead of in gloo's C++ teardown) and exits 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", str(ROOT / "tests" / "exit_worker.py")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("initialized at exit: False") == 2, r.stdout


def test_per_shard_batch_norm_is_not_the_global_model(tmp_path):
    """The control: plain BatchNorm normalises each shard by its own statistics, so 2 processes
    differ from 1 (this is what SyncBatchNorm fixes)."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for n, out in ((1, one), (2, two)):
        assert _run(n, out, "--dtype", "float64", "--bn", "local").returncode == 0
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert not torch.allclose(a["hparams"]["phi"], b["hparams"]["phi"], rtol=1e-6)


def _task_cli(tmp_path: Path, flags: list[str]) -> dict[int, subprocess.CompletedProcess]:
    """``python -m tasks <flags> --out tmp/n1`` in one process and the same under torchrun
    with 2 processes (``--out tmp/n2``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = {}
    for n in (1, 2):
        launcher = ([] if n == 1 else
                    ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"])
        r = subprocess.run([sys.executable, *launcher, "-m", "tasks", *flags, "--out",
                            str(tmp_path / f"n{n}")], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        done[n] = r
    return done


def test_ppi_task_cli_under_torchrun_equals_one_process(tmp_path):
    """``python -m tasks ppi`` with the same flags under torchrun: the learned task weights
    (which depend on every PT step and hypergradient, through the GIN's BatchNorm) equal the
    single-process run's, and rank 0 alone wrote the outputs."""
    import json

    done = _task_cli(tmp_path, ["ppi", "--synthetic", "--config", "smoke", "--method",
                                "meta_pt", "--seeds", "1", "--no-progress"])
    for n in (1, 2):  # the table is printed (and written, plotted) once: by rank 0
        assert done[n].stdout.count("PPI (synthetic stand-in") == 1, done[n].stdout[-2000:]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        assert not list(out.rglob("*.tmp"))
        runs[n] = json.loads((out / "runs" / "meta_pt__shared__s0.json").read_text())
    w1, w2 = (torch.tensor(runs[n]["weights"], dtype=torch.float64) for n in (1, 2))
    assert (w1 - 1).abs().max() > 1e-2  # the weights moved
    torch.testing.assert_close(w2 - 1, w1 - 1, rtol=1e-5, atol=1e-6)
    # (FT AUROCs are not compared: on 16 validation graphs a 1e-7 change of the encoder can
    # reorder tied scores)
    files = [sorted(p.relative_to(tmp_path / f"n{n}") for p in (tmp_path / f"n{n}").rglob("*")
                    if p.is_file()) for n in (1, 2)]
    assert files[0] == files[1]


def test_seed_parallel_spreads_seeds_over_ranks_and_rank0_aggregates(tmp_path):
    """Per-seed experiments (synthetic, ECG) run seed-parallel under torchrun: every seed once,
    on rank k % world, as a plain single process (its MetaPretrainer checkpoints on every rank),
    and one aggregate after all finished; a failing seed fails the job and leaves no
    aggregate."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    worker = str(ROOT / "tests" / "seed_parallel_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           worker]
    ok = subprocess.run([*cmd, str(tmp_path / "ok")], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=180)
    assert ok.returncode == 0, ok.stderr[-3000:]
    rows = json.loads((tmp_path / "ok" / "all.json").read_text())
    assert [(r["seed"], r["rank"]) for r in rows] == [(k, str(k % 2)) for k in range(5)]
    bad = subprocess.run([*cmd, str(tmp_path / "bad"), "--fail-seed", "3"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert bad.returncode != 0 and "seed 3 failed" in bad.stderr
    assert not (tmp_path / "bad" / "all.json").exists()


def test_synthetic_task_cli_under_torchrun_is_seed_parallel_and_equals_one_process(tmp_path):
    """``python -m tasks synthetic rotation`` with the same flags under torchrun: the seeds are
    split over the ranks, each runs as one process, rank 0 writes the same metrics."""
    import json

    runs = _task_cli(tmp_path, ["synthetic", "rotation", "--config", "tiny", "--no-progress"])
    assert runs[2].stdout.count("wrote") == 1  # one aggregate, by rank 0
    got = {n: json.loads((tmp_path / f"n{n}" / "metrics.json").read_text()) for n in (1, 2)}
    assert got[1]["seeds"] == got[2]["seeds"] == [0, 1]
    assert got[1]["final_phi"] == got[2]["final_phi"]


def test_ecg_task_cli_under_torchrun_is_seed_parallel_and_equals_one_process(tmp_path):
    """``python -m tasks ecg`` with the same flags under torchrun: PT seeds split over the
    ranks, rank 0 writes the same results table as one process."""
    import json

    _task_cli(tmp_path, ["ecg", "--synthetic", "--config", "smoke", "--method",
                         "no_pt,meta_simclr", "--n-ft", "20", "--seeds", "2", "--n-pool", "40",
                         "--n-test", "30", "--set", "pt_batch=8", "--set", "meta_batch=8",
                         "--set", "ft_epochs=2", "--set", "pt_epochs=1", "--no-progress"])
    got = {n: json.loads((tmp_path / f"n{n}" / "results.json").read_text()) for n in (1, 2)}
    assert all(len(list((tmp_path / f"n{n}" / "runs").glob("*.json"))) == 4 for n in (1, 2))
    assert got[1]["table"] == got[2]["table"]


def test_a_dead_rank_fails_the_job_loudly_and_resume_reaches_the_same_result(tmp_path):
    ref, out, ckpt = tmp_path / "ref.pt", tmp_path / "out.pt", tmp_path / "ckpt.pt"
    assert _run(2, ref, "--steps", "5").returncode == 0
    dead = _run(2, out, "--steps", "5", "--ckpt", str(ckpt), "--die-at", "3", timeout=180)
    assert dead.returncode != 0 and not out.exists()
    assert torch.load(ckpt, weights_only=False)["meta_steps_done"] >= 2
    resumed = _run(2, out, "--steps", "5", "--ckpt", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(torch.load(ref, weights_only=False), torch.load(out, weights_only=False), 1e-6)


# --- single-process behaviour (no torchrun): identities and clear errors ---------------------
def test_outside_torchrun_every_primitive_is_the_identity():
    from hypergrad import distributed as hd

    x = torch.randn(6, 3)
    batch = {"x": x, "y": torch.arange(6), "name": "train"}
    assert hd.shard(batch) is batch and hd.all_gather(x) is x and hd.all_reduce_sum(x) is x
    assert hd.synced({"w": x})["w"] is x and hd.world_size() == 1 and hd.is_main()
    hd.barrier()


def test_shard_rejects_batches_it_cannot_split_evenly():
    from hypergrad import distributed as hd

    with pytest.raises(ValueError, match="share their first dimension"):
        hd.shard({"x": torch.zeros(4, 2), "y": torch.zeros(5)})
    with pytest.raises(TypeError, match="`batch` must be a tensor"):
        hd.shard(["a", 3])
    with pytest.raises(TypeError, match="`batch` must be a tensor with a batch dimension"):
        hd.shard(torch.tensor(3.0))
    with pytest.raises(TypeError, match="ndarray"):
        hd.shard({"x": torch.zeros(4), "y": np.zeros(4)})


def test_convert_sync_batchnorm_keeps_names_dtype_state_and_frozen_flags():
    from hypergrad import distributed as hd

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                              torch.nn.Sequential(torch.nn.BatchNorm2d(2))).double().train()
    net[1].running_mean.fill_(0.5)
    net[1].bias.requires_grad_(False)
    names = dict(net.named_parameters()).keys() | dict(net.named_buffers()).keys()
    assert hd.convert_sync_batchnorm(net) is net
    assert isinstance(net[1], hd.SyncBatchNorm) and isinstance(net[2][0], hd.SyncBatchNorm)
    assert names == dict(net.named_parameters()).keys() | dict(net.named_buffers()).keys()
    assert net[1].running_mean.dtype == torch.float64 and float(net[1].running_mean[0]) == 0.5
    assert net[1].weight.requires_grad and not net[1].bias.requires_grad
    top = hd.convert_sync_batchnorm(torch.nn.BatchNorm1d(3))  # the module itself
    assert isinstance(top, hd.SyncBatchNorm)


class _MyBN(torch.nn.BatchNorm1d):
    pass


@pytest.mark.parametrize("bn", [torch.nn.SyncBatchNorm(3), _MyBN(3)], ids=["torch_sync", "sub"])
def test_convert_sync_batchnorm_refuses_batchnorms_it_cannot_convert_exactly(bn):
    from hypergrad import distributed as hd

    with pytest.raises(TypeError, match="cannot convert"):
        hd.convert_sync_batchnorm(torch.nn.Sequential(bn))


def test_sync_batchnorm_is_plain_batchnorm_in_one_process():
    from hypergrad import distributed as hd

    ref = torch.nn.BatchNorm1d(4).double().train()
    sync = hd.convert_sync_batchnorm(torch.nn.BatchNorm1d(4).double().train())
    x = torch.randn(8, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, ref.running_var, rtol=0, atol=0)
