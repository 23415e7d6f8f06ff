"""Is there a per-example signal for phi to learn? The hypergradient of the meta-objective with
respect to each PT example's own warp strength, averaged by ground-truth group.

At a SimCLR-pretrained point (fixed strength ``cfg.warp``), with the online FT head fitted on
D_FT(Meta)-train features, the strengths of a PT batch are made the hyperparameters
(``hparams = {"s": (B,)}``) of ``hg.pretraining_hypergrad``: ``dL_val/ds_i`` is exactly the
signal that reaches phi through ``ds_i/dphi``. A positive mean for a group means the
meta-gradient pushes that group's warps down.

    python -m studies.ecg_diagnose --n-ft 100 --batches 30 --out runs/ecg_diag
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import hypergrad as hg
from tasks.common import write_json
from tasks.ecg.methods import (
    CONFIGS,
    SimCLRNet,
    _gen,
    fit_head,
    ft_bce,
    neumann_solver,
    pretrain,
    simclr_loss,
    with_overrides,
)
from tasks.ecg.synthetic import GROUPS
from tasks.ecg.task import synthetic_task


def per_example_hypergrads(task, cfg, pt: dict, n_ft: int, seed: int, batches: int,
                           progress: bool = True) -> dict[str, list[float]]:
    """``dL_val/ds_i`` for ``batches`` PT batches of the pool, listed by ground-truth group."""
    net = SimCLRNet(cfg, task.x.shape[1]).to(task.x.dtype)
    tr, va = task.ft_split(n_ft, seed)
    train, val = (task.x[tr], task.y[tr]), (task.x[va], task.y[va])
    head = fit_head(net, pt["pt_params"], pt["ft_head"], train, cfg)
    out: dict[str, list[float]] = {g: [] for g in GROUPS}
    pool = task.pt_idx
    from tqdm.auto import tqdm

    for b in tqdm(range(batches), desc="hypergrads", disable=not progress):
        idx = pool[torch.randperm(len(pool), generator=_gen(seed, 11, b))[: cfg.pt_batch].numpy()]
        batch = {"x": task.x[idx], "seed": 10_000 + b}
        s0 = torch.full((len(idx),), float(cfg.warp), dtype=task.x.dtype)
        res = hg.pretraining_hypergrad(
            lambda p, h, batch=batch: simclr_loss(net, cfg, p, h["s"], batch),
            lambda e, hd: ft_bce(net, e, hd, train), lambda e, hd: ft_bce(net, e, hd, val),
            pt["pt_params"], head, {"s": s0},
            encoder=lambda p: {k: v for k, v in p.items() if k.startswith("enc.")},
            ft_steps=cfg.K, ft_lr=cfg.ft_unroll_lr, solver=neumann_solver(cfg),
        )
        for gi, v in zip(task.group[idx], res.hypergrad["s"].tolist()):
            out[GROUPS[int(gi)]].append(v)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.ecg_diagnose", description=__doc__)
    p.add_argument("--n-ft", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--config", choices=sorted(CONFIGS), default="default")
    p.add_argument("--warp", type=float, default=None, help="override the fixed SimCLR strength")
    p.add_argument("--head-steps", type=int, default=None,
                   help="Adam steps fitting the FT head (default: the config's head_refit_steps)")
    p.add_argument("--n-pool", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pt", help="a saved SimCLR pre-training (OUT/pt/simclr_s0.pt of the CLI) "
                   "instead of pre-training here")
    p.add_argument("--out", required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    cfg = with_overrides(CONFIGS[args.config], warp=args.warp, head_refit_steps=args.head_steps)
    task = synthetic_task(args.n_pool, 100)
    pt = (torch.load(args.pt, weights_only=True) if args.pt
          else pretrain("simclr", task.x[task.pt_idx], cfg, args.seed, progress=True))
    hgs = per_example_hypergrads(task, cfg, pt, args.n_ft, args.seed, args.batches)
    summary = {}
    for g, v in hgs.items():
        a = np.asarray(v)
        summary[g] = {"mean": float(a.mean()), "sem": float(a.std(ddof=1) / np.sqrt(len(a))),
                      "n": len(a)}
    t, rest = np.asarray(hgs["timing"]), np.concatenate([hgs["normal"], hgs["morphology"]])
    diff = float(t.mean() - rest.mean())
    se = float(np.sqrt(t.var(ddof=1) / len(t) + rest.var(ddof=1) / len(rest)))
    summary["timing_minus_rest"] = {"diff": diff, "se": se, "z": diff / se}
    write_json(Path(args.out) / "hypergrad_by_group.json",
               {"summary": summary, "warp": cfg.warp, "n_ft": args.n_ft, "seed": args.seed,
                "batches": args.batches, "head_steps": cfg.head_refit_steps,
                "argv": sys.argv[1:] if argv is None else argv})
    for g, d in summary.items():
        print(g, d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
