"""``tasks.common.seed_parallel`` under torchrun, used by tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/seed_parallel_worker.py \
        OUT [--fail-seed K]

Seeds 0..4 each write OUT/seed<k>.json (with the rank that ran it); rank 0 aggregates them into
OUT/all.json. ``--fail-seed K`` makes seed K raise.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from worker_exit import run_and_exit  # the script's folder is on sys.path

import hypergrad as hg
from hypergrad import distributed as hd
from tasks.common import seed_parallel, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--fail-seed", type=int, default=-1)
    args = ap.parse_args()

    def run(seeds: list[int]) -> None:
        for k in seeds:
            if k == args.fail_seed:
                raise ValueError(f"seed {k} failed")
            # each seed is a plain single process: its MetaPretrainer checkpoints on any rank
            trainer = hg.MetaPretrainer(
                pt_loss=lambda p, h, b: ((p["w"] - h["c"]) ** 2).sum(),
                ft_loss=lambda e, hd_, b: ((e["w"] + hd_["b"] - 1.0) ** 2).sum(),
                pt_params={"w": torch.zeros(2)}, ft_head={"b": torch.zeros(2)},
                hparams={"c": torch.full((2,), float(k))}, P=2, ft_lr=0.1)
            ckpt = args.out / f"seed{k}" / "ckpt.pt"
            trainer.run(3, lambda i: None, lambda j: (None, None), checkpoint=ckpt,
                        checkpoint_every=1, progress=False)
            assert hd.world_size() == 1 and ckpt.exists()
            write_json(args.out / f"seed{k}.json", {"seed": k, "rank": os.environ["RANK"]})

    def aggregate() -> dict:
        rows = [json.loads((args.out / f"seed{k}.json").read_text()) for k in range(5)]
        return write_json(args.out / "all.json", rows)

    seed_parallel(run, list(range(5)), aggregate, timeout_s=60)


if __name__ == "__main__":
    run_and_exit(main)
