"""``python -m tasks synthetic {rotation,noisy,exactness} [--config smoke|paper] [--seeds ...]``.

Each experiment writes ``metrics.json`` and a PNG to ``--out`` (default
``runs/synthetic/<experiment>``). Runs resume: every seed keeps a MetaPretrainer checkpoint in
``<out>/seed<k>/ckpt.pt`` and a finished seed's ``result.json`` is reused, so rerunning the same
command after an interruption finishes the work instead of starting over (``--fresh`` clears
``--out`` first). ``--set key=value`` overrides one config field (e.g. ``--set K=3``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import torch

from tasks.common import apply_overrides, check_settings, launch_rank, seed_parallel

from . import exactness as E
from . import noisy as N
from . import rotation as R

EXPERIMENTS = {"rotation": R, "noisy": N, "exactness": E}
DEFAULT_SEEDS = {"rotation": {"paper": "0-9", "smoke": "0-9", "tiny": "0-1"},
                 "noisy": {"paper": "0-4", "smoke": "0", "tiny": "0"},
                 "exactness": {"paper": "0", "smoke": "0", "tiny": "0"}}


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"3"``, ``"0,2,5"`` or ``"10"`` -> list of ints (``"N"`` alone = one seed)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            seeds.extend(range(int(a), int(b) + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks synthetic",
                                description="Synthetic reproductions of Raghu et al. 2021.")
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--config", default="paper", choices=["paper", "smoke", "tiny"],
                   help="preset (smoke: a few minutes on 2 CPU cores; tiny: for tests)")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="seeds, e.g. 0-9 or 0,3,5 (rotation: seed k starts from init angle "
                   "18*(k mod 10) degrees); exactness uses the first only")
    p.add_argument("--out", type=Path, default=None, help="output directory (default "
                   "runs/synthetic/EXPERIMENT, or EXPERIMENT_CONFIG for configs other than paper)")
    p.add_argument("--data-dir", default=None,
                   help="directory with MNIST idx files (default: sklearn's bundled digits)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one config field (repeatable)")
    p.add_argument("--part", default="all", choices=["all", "cosine", "kp"],
                   help="exactness only: which part of the study")
    p.add_argument("--fresh", action="store_true", help="delete --out before running")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    mod = EXPERIMENTS[args.experiment]
    cfg = mod.CONFIGS[args.config]
    if args.data_dir is not None and hasattr(cfg, "data_dir"):
        cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
    cfg = apply_overrides(cfg, args.overrides)
    # one directory per config: finished seeds are reused, so smoke and paper must not share
    name = args.experiment if args.config == "paper" else f"{args.experiment}_{args.config}"
    out = args.out or Path("runs/synthetic") / name
    seeds = args.seeds or parse_seeds(DEFAULT_SEEDS[args.experiment][args.config])
    if args.experiment == "exactness" and args.seeds:
        cfg = dataclasses.replace(cfg, seed=seeds[0])  # part of the settings checked below
    rank, world = launch_rank()
    if args.fresh and world > 1:
        raise SystemExit("--fresh under torchrun would let ranks delete each other's files; "
                         "delete --out before launching instead")
    if args.fresh and out.exists():
        shutil.rmtree(out)
    check_settings(out, {"experiment": args.experiment, "config": dataclasses.asdict(cfg)},
                   "seed*/result.json", fix="use a new --out or --fresh")
    progress = not args.no_progress
    t0 = time.perf_counter()
    if args.experiment == "exactness":
        if rank != 0:  # one run: under torchrun, rank 0 does it and the others have nothing to do
            return 0
        metrics = E.run(cfg, out, part=args.part, progress=progress)
    else:
        # under torchrun: seed parallel (rank r runs seeds r, r+N, ...), rank 0 aggregates
        metrics = seed_parallel(
            lambda mine: mod.run(cfg, mine, out, progress=progress and rank == 0,
                                 aggregate=False),
            seeds, lambda: mod.run(cfg, seeds, out, progress=False))
        if rank != 0:
            return 0
    print(mod.summary(metrics))
    print(f"wrote {out / 'metrics.json'} ({time.perf_counter() - t0:.0f} s)")
    return 0
