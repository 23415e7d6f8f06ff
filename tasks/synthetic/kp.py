"""The K / P study of the exactness experiment: Algorithm 1's recovered angle for each K and P."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common import mean_std

from . import rotation as R
from ._runner import run_seeds

__all__ = ["kp_study"]


def kp_study(cfg: Any, out: Path, progress: bool = True) -> dict[str, Any]:
    """Recovered angle (Algorithm 1, main rotation setup) for each K and P, same PT budget.

    ``cfg`` is an ``exactness.ExactnessConfig`` (its ``kp_*`` fields).

    meta_steps = kp_pt_steps / P and the meta learning rate scales with P / 10, so phi can
    travel the same distance per PT step in every setting (Adam moves ~lr per meta step).
    """
    base = dataclasses.replace(R.CONFIGS["paper"], ift="neumann")  # Algorithm 1's IFT
    table = []
    Ks, Ps = [int(k) for k in cfg.kp_K], [int(p) for p in cfg.kp_P]
    grid = [(K, P) for K in Ks for P in Ps]
    if cfg.kp_cross:  # K sweep at P0 = 10, P sweep at K0 = 1
        P0, K0 = (10 if 10 in Ps else Ps[0]), (1 if 1 in Ks else Ks[0])
        grid = [(K, P0) for K in Ks] + [(K0, P) for P in Ps if P != P0]
    for K_, P_ in grid:
        rcfg = dataclasses.replace(
            base, K=K_, P=P_, meta_steps=max(1, cfg.kp_pt_steps // P_),
            meta_lr=base.meta_lr * P_ / 10, meta_lr_final=base.meta_lr_final * P_ / 10,
        )
        if cfg.kp_pt_steps < 100:  # the tiny test configuration
            rcfg = dataclasses.replace(R.CONFIGS["tiny"], K=K_, P=P_, ift="neumann",
                                       meta_steps=max(1, cfg.kp_pt_steps // P_))
        seeds = [int(s) for s in cfg.kp_seeds]

        def one(seed: int, seed_dir: Path, rcfg=rcfg) -> dict[str, Any]:
            init = rcfg.init_angles[seed % len(rcfg.init_angles)]
            res = R.run_one(rcfg, seed, init, seed_dir, progress=False)
            return {k: res[k] for k in ("init_angle", "phi", "error", "final_val_loss")}

        res = run_seeds(out / f"K{K_}_P{P_}", seeds, one, progress=progress,
                        desc=f"K={K_} P={P_}")
        errs = [r["error"] for r in res]
        m, s = mean_std(errs)
        table.append({"K": K_, "P": P_, "meta_steps": rcfg.meta_steps,
                      "meta_lr": rcfg.meta_lr, "seeds": seeds,
                      "final_phi": [r["phi"] for r in res], "errors": errs,
                      "error_mean": m, "error_std": s,
                      "error_median": float(np.median(errs))})
    return {"kp_table": table}
