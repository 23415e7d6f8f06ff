"""Small-loss heuristic on the noisy-label task (issue 20): weights = inverse plain-PT loss.

    python -m studies.noisy_small_loss --seeds 0-9 --out runs/noisy_small_loss

Per seed: ``NoisyTask`` (config ``paper``) and its plain-PT trainer (``meta=False``, the same
PT steps Meta-PT takes with the weight net frozen); the heuristic's clean / noisy mean-weight
ratio, median ratio and AUROC at the end of the warm-up (``cfg.warmup`` outer iterations, where
Meta-PT starts learning weights; the declared primary point) and after ``warmup + meta_steps``
(as many PT steps as Meta-PT's whole run). Writes ``OUT/small_loss.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from tasks.common import seed_everything, write_json
from tasks.synthetic.baselines import small_loss_weights
from tasks.synthetic.metrics import weight_stats
from tasks.synthetic.noisy import CONFIGS, NoisyTask


def run_seed(cfg_name: str, seed: int, eps: float) -> dict[str, dict[str, float]]:
    cfg = CONFIGS[cfg_name]
    seed_everything(seed)
    task = NoisyTask(cfg, seed)
    tr = task.trainer(meta=False)
    noisy = task.noisy.numpy()
    out = {}
    for point, outer in (("warmup", cfg.warmup), ("end", cfg.warmup + cfg.meta_steps)):
        tr.run(outer, task.pt_batch, task.ft_batch, progress=False)
        out[point] = weight_stats(small_loss_weights(task, tr.pt_params, eps), noisy)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0-9")
    p.add_argument("--config", default="paper", choices=sorted(CONFIGS))
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    lo, _, hi = a.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    torch.set_num_threads(1)
    res = {s: run_seed(a.config, s, a.eps) for s in seeds}
    summary = {"config": a.config, "eps": a.eps, "seeds": seeds, "per_seed": res}
    for point in ("warmup", "end"):
        for k in ("ratio", "median_ratio", "auroc"):
            v = np.array([res[s][point][k] for s in seeds])
            summary[f"{point}_{k}_mean"] = float(v.mean())
            summary[f"{point}_{k}_std"] = float(v.std(ddof=1)) if len(v) > 1 else None
    write_json(Path(a.out) / "small_loss.json", summary)
    for point in ("warmup", "end"):
        print(
            point,
            {k: round(summary[f"{point}_{k}_mean"], 4) for k in ("ratio", "median_ratio", "auroc")},
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
