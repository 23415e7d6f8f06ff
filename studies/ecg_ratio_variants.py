"""Meta/plain PT time ratio of ``hg.MetaPretrainer`` for a few settings (tasks/ecg/RESULTS.md):
the default (the authors' 1-term Neumann series, no damping, head refit), the previous default
(3 terms, damping 1) and that without the head refit. Each: plain, meta, plain, meta (so the
two are interleaved), 10 outer iterations, P=10, K=1.

    python -m studies.ecg_ratio_variants --out runs/ecg_ratio/b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tasks.ecg.cli import measure_time_ratio
from tasks.ecg.methods import CONFIGS, with_overrides
from tasks.ecg.task import synthetic_task
from tasks.harness import cached

VARIANTS = {"neumann1_refit10": {},
            "neumann3_damped_refit10": {"neumann_terms": 3, "neumann_damping": 1.0},
            "neumann3_damped_refit0": {"neumann_terms": 3, "neumann_damping": 1.0,
                                       "head_refit_steps": 0}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.ecg_ratio_variants", description=__doc__)
    p.add_argument("--outer", type=int, default=10)
    p.add_argument("--only", default="", help="comma-separated subset of the variants")
    p.add_argument("--out", required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    task = synthetic_task(2000, 1000)
    only = [v for v in args.only.split(",") if v]
    for name, kw in VARIANTS.items():
        if only and name not in only:
            continue
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        cfg = with_overrides(CONFIGS["default"], **kw)
        r = cached(out / "time_ratio.json",
                   lambda cfg=cfg: measure_time_ratio(task, cfg, 100, args.outer))
        print(name, round(r["ratio"], 3), [round(t, 1) for t in r["plain_seconds"]],
              [round(t, 1) for t in r["meta_seconds"]], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
