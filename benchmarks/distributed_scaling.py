"""Wall time per meta step with 1 vs N processes (gloo, CPU) and the communication volume.

    python -m benchmarks.distributed_scaling [--nproc 2] [--steps 6] [--hidden 256]

Runs the same data-parallel MetaPretrainer (hypergrad.distributed.data_parallel losses) under
``torchrun --nproc-per-node 1`` and ``N`` on the same global batches, and counts the bytes every
rank sends to all-reduce per meta step (by wrapping torch.distributed.all_reduce inside the
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


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import hypergrad as hg
    from hypergrad import distributed as hd

    torch.set_num_threads(1)
    hd.init(timeout_s=120)
    sent = {"bytes": 0, "calls": 0}
    if hd.world_size() > 1:
        real = dist.all_reduce

        def counting(t, *a, **k):
            sent["bytes"] += t.numel() * t.element_size()
            sent["calls"] += 1
            return real(t, *a, **k)

        dist.all_reduce = counting
    g = torch.Generator().manual_seed(0)
    n, d, T, H = 4096, 64, 100, args.hidden
    X = torch.randn(n, d, generator=g)
    W = torch.randn(d, T, generator=g)
    Y = (torch.tanh(X @ W) > 0).float()
    y_ft = (X[:, :4].sum(1) > 0).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def feats(p, idx):
        return torch.relu(torch.relu(X[idx] @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"])

    def pt_loss(p, h, idx):  # T binary PT tasks with weights 2 sigmoid(phi) (the PPI recipe)
        per_task = bce(feats(p, idx) @ p["Wt"], Y[idx], reduction="none").mean(0)
        return (2 * torch.sigmoid(h["phi"]) * per_task).mean()

    def ft_loss(e, hd_, idx):
        return bce(feats(e, idx) @ hd_["w"] + hd_["b"], y_ft[idx])

    def batch(seed):
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: args.batch]
        return hd.shard(idx)

    gi = torch.Generator().manual_seed(1)
    trainer = hg.MetaPretrainer(
        pt_loss=hd.data_parallel(pt_loss), ft_loss=hd.data_parallel(ft_loss),
        pt_params={"W1": torch.randn(d, H, generator=gi) / d**0.5, "b1": torch.zeros(H),
                   "W2": torch.randn(H, H, generator=gi) / H**0.5, "b2": torch.zeros(H),
                   "Wt": torch.randn(H, T, generator=gi) / H**0.5},
        ft_head={"w": torch.zeros(H), "b": torch.zeros(())}, hparams={"phi": torch.zeros(T)},
        encoder=lambda p: {k: p[k] for k in ("W1", "b1", "W2", "b2")},
        pt_optimizer=lambda ts: torch.optim.Adam(ts, lr=1e-3), P=10, K=1, ft_lr=1e-2,
        meta=not args.plain,
    )
    trainer.run(1, lambda i: batch(i), lambda j: (batch(10**6 + j), batch(2 * 10**6 + j)),
                progress=False)  # warm-up
    sent.update(bytes=0, calls=0)
    t0 = time.perf_counter()
    trainer.run(1 + args.steps, lambda i: batch(i),
                lambda j: (batch(10**6 + j), batch(2 * 10**6 + j)), progress=False)
    per_step = (time.perf_counter() - t0) / args.steps
    if hd.is_main():
        n_params = sum(v.numel() for v in trainer.pt_params.values())
        Path(args.out).write_text(json.dumps({
            "world": hd.world_size(), "seconds_per_meta_step": per_step,
            "allreduce_bytes_per_meta_step": sent["bytes"] / args.steps,
            "allreduce_calls_per_meta_step": sent["calls"] / args.steps,
            "pt_params": n_params, "meta": not args.plain}))


def launch(nproc: int, args: argparse.Namespace, plain: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "benchmarks.distributed_scaling", "--worker",
               "--out", str(out), "--steps", str(args.steps), "--hidden", str(args.hidden),
               "--batch", str(args.batch)] + (["--plain"] if plain else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="")
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    rows = {(w, plain): launch(w, args, plain) for w in (1, args.nproc) for plain in (False, True)}
    one, many = rows[(1, False)], rows[(args.nproc, False)]
    eff = one["seconds_per_meta_step"] / (args.nproc * many["seconds_per_meta_step"])
    mb = many["allreduce_bytes_per_meta_step"] / 2**20
    print("| processes | s / meta step (meta-PT) | s / outer step (plain PT, P=10) | "
          "all-reduce MiB / meta step / rank |\n|---|---|---|---|")
    for w in (1, args.nproc):
        m, p = rows[(w, False)], rows[(w, True)]
        vol = m["allreduce_bytes_per_meta_step"] / 2**20
        print(f"| {w} | {m['seconds_per_meta_step']:.3f} | {p['seconds_per_meta_step']:.3f} | "
              f"{vol:.2f} |")
    print(f"\nscaling efficiency with {args.nproc} processes: {eff:.2f} "
          f"(speed-up {one['seconds_per_meta_step'] / many['seconds_per_meta_step']:.2f}x); "
          f"{many['pt_params']} PT parameters; {mb:.2f} MiB all-reduced per meta step per rank "
          f"in {many['allreduce_calls_per_meta_step']:.0f} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
