"""Wall time per meta step with 1 vs N processes (gloo, CPU) and the communication volume,
on the synthetic PPI task (GIN encoder, 200 weighted PT tasks; ``tasks/ppi``).

    python -m studies.distributed_scaling [--nproc 2] [--steps 6] [--config synthetic|paper]

Runs the PPI task's own data-parallel Meta-PT trainer (``tasks.ppi.net.build_trainer``:
sharded batches, ``data_parallel`` losses, ``SyncBatchNorm``) under ``torchrun
--nproc-per-node 1`` and ``N`` on the same global batches, and counts the bytes every rank
sends to all-reduce per meta step (by wrapping ``torch.distributed.all_reduce`` inside the
worker). Communication volume, not 2-core timings, is what decides scaling on a real cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _problem(config: str, data_root: Path):
    from tasks.ppi.config import get_config
    from tasks.ppi.data import load_ppi
    from tasks.ppi.finetune import make_problem
    from tasks.ppi.synthetic import read_meta, write_synthetic

    s = get_config(config)
    root = write_synthetic(data_root, s.synthetic)
    return make_problem(load_ppi(root), s, read_meta(root)["relevance"]), s


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from hypergrad import distributed as hd
    from tasks.ppi.net import build_trainer

    torch.set_num_threads(1)
    hd.init(backend="gloo", timeout_s=300)
    sent = {"bytes": 0, "calls": 0}
    if hd.world_size() > 1:
        real = dist.all_reduce

        def counting(t, *a, **k):
            sent["bytes"] += t.numel() * t.element_size()
            sent["calls"] += 1
            return real(t, *a, **k)

        dist.all_reduce = counting
    problem, s = _problem(args.config, Path(args.data))
    trainer, pt_batch, ft_batch = build_trainer(problem, s, 0, None, meta=not args.plain)
    trainer.run(1, pt_batch, ft_batch, progress=False)  # warm-up
    sent.update(bytes=0, calls=0)
    t0 = time.perf_counter()
    trainer.run(1 + args.steps, pt_batch, ft_batch, progress=False)
    per_step = (time.perf_counter() - t0) / args.steps
    if hd.is_main():
        Path(args.out).write_text(json.dumps({
            "world": hd.world_size(), "seconds_per_meta_step": per_step,
            "allreduce_bytes_per_meta_step": sent["bytes"] / args.steps,
            "allreduce_calls_per_meta_step": sent["calls"] / args.steps,
            "pt_params": sum(v.numel() for v in trainer.pt_params.values()),
            "phi": sum(v.numel() for v in trainer.hparams.values()),
            "P": s.P, "batch_size": s.batch_size, "meta_batch_size": s.meta_batch_size,
            "meta": not args.plain}))
    hd.shutdown()


def launch(nproc: int, args: argparse.Namespace, plain: bool, data: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "studies.distributed_scaling", "--worker",
               "--out", str(out), "--steps", str(args.steps), "--config", args.config,
               "--data", str(data)] + (["--plain"] if plain else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"torchrun with {nproc} processes failed:\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help="JSON with every row (default: "
                    "benchmarks/results/distributed_scaling_<config>.json)")
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--config", default="synthetic", help="tasks.ppi config (smoke for a test)")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    args.out = args.out or str(ROOT / f"benchmarks/results/distributed_scaling_{args.config}.json")
    with tempfile.TemporaryDirectory() as tmp:
        from tasks.ppi.config import get_config
        from tasks.ppi.synthetic import write_synthetic

        # generate the data once, outside the timed workers (which load it)
        write_synthetic(Path(tmp), get_config(args.config).synthetic)
        rows = {(w, plain): launch(w, args, plain, Path(tmp))
                for w in (1, args.nproc) for plain in (False, True)}
    one, many = rows[(1, False)], rows[(args.nproc, False)]
    speedup = one["seconds_per_meta_step"] / many["seconds_per_meta_step"]
    result = {"config": args.config, "nproc": args.nproc, "steps": args.steps,
              "efficiency": speedup / args.nproc, "speedup": speedup,
              "load_average": os.getloadavg()[0],
              "rows": [{"processes": w, "plain": pl, **r} for (w, pl), r in rows.items()]}
    from benchmarks.report import distributed_markdown

    print(distributed_markdown(result))
    from tasks.common import write_json

    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
