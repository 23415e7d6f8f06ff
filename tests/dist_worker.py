"""A meta-pretraining run under torchrun, used by tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/dist_worker.py OUT \
        [--steps M] [--dtype float64] [--ckpt PATH] [--die-at J]

Every rank takes its shard of each global batch; the result (theta_PT, psi_FT, phi, history) is
written by rank 0 to OUT. With N = 1 it is the single-process reference on the same global
batches.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from worker_exit import run_and_exit  # the script's folder is on sys.path

import hypergrad as hg
from hypergrad import distributed as hd

GLOBAL_BATCH = 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--die-at", type=int, default=-1)
    ap.add_argument("--bn", choices=["none", "sync", "local"], default="none",
                    help="batch-normalise the features (sync: hd.SyncBatchNorm)")
    ap.add_argument("--gather", action="store_true",
                    help="add a loss coupling examples across the batch (hd.all_gather)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    hd.init(backend="gloo", timeout_s=30)
    dtype = getattr(torch, args.dtype)

    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 8, generator=g, dtype=dtype)
    tasks = torch.randn(8, 6, generator=g, dtype=dtype)
    Y = torch.tanh(X @ tasks) + 0.3 * torch.randn(512, 6, generator=g, dtype=dtype)
    y_ft = torch.tanh(X @ tasks[:, :2]).sum(1)

    bn = torch.nn.Sequential(torch.nn.BatchNorm1d(16, affine=False, dtype=dtype)).train()
    if args.bn == "sync":
        hd.convert_sync_batchnorm(bn)
    bn_bufs = {k: v.clone() for k, v in bn.named_buffers()}

    def features(p, idx):
        z = X[idx] @ p["W1"] + p["b1"]
        if args.bn != "none":  # batch statistics over the (global, if synced) batch
            bufs = {k: v.clone() for k, v in bn_bufs.items()}
            z = torch.func.functional_call(bn, ({}, bufs), (z,))
        return torch.tanh(z)

    def pt_loss(p, h, idx):  # per-task weights 2 sigmoid(phi), as in the PPI recipe
        f = features(p, idx)
        err = (f @ p["W2"] - Y[idx]) ** 2
        loss = (2 * torch.sigmoid(h["phi"]) * err).mean()
        if args.gather:  # mean over local rows of a softmax over all (global) rows
            z = f @ p["W2"]
            logits = z @ hd.all_gather(z).T
            loss = loss + 0.1 * torch.logsumexp(logits, dim=1).mean()
        return loss

    def ft_loss(e, hd_, idx):
        return ((features(e, idx) @ hd_["w"] - y_ft[idx]) ** 2).mean()

    def batch(seed):
        idx = torch.randperm(512, generator=torch.Generator().manual_seed(seed))[:GLOBAL_BATCH]
        return hd.shard(idx)

    gi = torch.Generator().manual_seed(1)
    trainer = hg.MetaPretrainer(
        pt_loss=hd.data_parallel(pt_loss), ft_loss=hd.data_parallel(ft_loss),
        pt_params={"W1": 0.3 * torch.randn(8, 16, generator=gi, dtype=dtype),
                   "b1": torch.zeros(16, dtype=dtype),
                   "W2": 0.3 * torch.randn(16, 6, generator=gi, dtype=dtype)},
        ft_head={"w": torch.zeros(16, dtype=dtype)}, hparams={"phi": torch.zeros(6, dtype=dtype)},
        encoder=lambda p: {"W1": p["W1"], "b1": p["b1"]},
        pt_optimizer=lambda ts: torch.optim.SGD(ts, lr=0.1),
        meta_optimizer=lambda ts: torch.optim.SGD(ts, lr=1.0),
        P=3, K=1, ft_lr=0.1,
    )

    def die(j, metrics):
        if j + 1 == args.die_at and hd.rank() == 1:
            sys.stdout.flush()
            os._exit(17)  # a rank dies mid-run

    trainer.run(args.steps, lambda i: batch(10_000 + i),
                lambda j: (batch(20_000 + j), batch(30_000 + j)),
                checkpoint=args.ckpt, checkpoint_every=1, progress=False, callback=die)
    same = torch.tensor([float(hg.tree.norm(trainer.hparams["phi"]).detach())], dtype=torch.float64)
    if hd.world_size() > 1:  # meta-parameters must be identical on every rank
        gathered = [torch.zeros_like(same) for _ in range(hd.world_size())]
        torch.distributed.all_gather(gathered, same)
        assert all(torch.equal(x, same) for x in gathered), gathered
    if hd.is_main():
        torch.save({"pt_params": hg.tree.detach(trainer.pt_params),
                    "ft_head": hg.tree.detach(trainer.ft_head),
                    "hparams": hg.tree.detach(trainer.hparams),
                    "history": trainer.history, "world": hd.world_size()}, args.out)
    hd.shutdown()


if __name__ == "__main__":
    run_and_exit(main)
