"""Meta/plain PT time ratio of ``hg.MetaPretrainer`` for three settings (tasks/ecg/RESULTS.md):
the validated default (3 Neumann terms, head refit), 1 Neumann term (the authors' default) and
no head refit. Each: plain, meta, plain, meta, 10 outer iterations, P=10, K=1.

    python -m tasks.ecg.ratio_variants --out runs/ecg_ratio/b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tasks.ecg.cli import synthetic_task, time_ratio
from tasks.ecg.methods import CONFIGS, with_overrides

VARIANTS = {"neumann3_refit10": {}, "neumann1_refit10": {"neumann_terms": 1},
            "neumann3_refit0": {"head_refit_steps": 0}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.ecg.ratio_variants", description=__doc__)
    p.add_argument("--outer", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    task = synthetic_task(2000, 1000)
    for name, kw in VARIANTS.items():
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        r = time_ratio(task, with_overrides(CONFIGS["default"], **kw), 100, args.outer, out)
        print(name, round(r["ratio"], 3), [round(t, 1) for t in r["plain_s"]],
              [round(t, 1) for t in r["meta_s"]], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
