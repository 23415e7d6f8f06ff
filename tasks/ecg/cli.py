"""``python -m tasks ecg``: No PT / SimCLR / Meta SimCLR on PTB-XL or the synthetic stand-in.

Example (the synthetic validation of tasks/ecg/RESULTS.md)::

    python -m tasks ecg --synthetic --method no_pt,simclr,meta_simclr --n-ft 100,250,500 \\
        --seeds 3 --config default --out runs/ecg

Resumable: every fine-tuning result is a JSON file under ``OUT/runs`` and every pre-training
result a file under ``OUT/pt``; finished ones are skipped, and an interrupted pre-training
resumes from its ``hg.MetaPretrainer`` checkpoint under ``OUT/ckpt``.

Under ``torchrun --nproc-per-node N`` (same flags) the PT seeds are split over the ranks (rank r
runs seeds r, r+N, ... with all their methods and |D_FT| values); rank 0 then writes the table,
the plots and the time ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.common import (
    apply_overrides,
    atomic_save,
    check_settings,
    launch_rank,
    seed_everything,
    seed_parallel,
    write_json,
)
from tasks.ecg.methods import CONFIGS, ECGConfig, finetune, phi_strengths, pretrain, with_overrides
from tasks.ecg.plots import plot_augmentations, plot_strengths
from tasks.ecg.report import METHODS, summarize, time_ratio
from tasks.ecg.synthetic import GROUPS, VERSIONS
from tasks.ecg.task import Task, ptbxl_task, synthetic_task

__all__ = ["METHODS", "Task", "synthetic_task", "ptbxl_task", "build_parser", "main"]
PROBE = 300  # test examples whose strengths are logged after every meta step


def _parse_ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{name} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise SystemExit(f"{name} must be positive integers, got {text!r}")
    return vals


def _config(name: str, items: list[str]) -> ECGConfig:
    """The named config with the ``--set`` overrides (a clear exit on a bad one)."""
    try:
        return apply_overrides(CONFIGS[name], items)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks ecg", description=__doc__.split("\n")[0])
    p.add_argument("--method", default="no_pt,simclr,meta_simclr",
                   help=f"comma-separated subset of {','.join(METHODS)} or 'all'")
    p.add_argument("--n-ft", default="100,250,500", help="|D_FT| values (comma-separated)")
    p.add_argument("--seeds", type=int, default=3, help="PT seeds (also draw D_FT)")
    p.add_argument("--ft-seeds", type=int, default=1, help="FT seeds per PT seed")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", help="PTB-XL directory (ptbxl_database.csv, records100/)")
    src.add_argument("--synthetic", action="store_true", help="synthetic 12-lead stand-in")
    p.add_argument("--labels", choices=("paper", "benchmark"), default="paper")
    p.add_argument("--cache", help="npz cache of the PTB-XL signals")
    p.add_argument("--config", choices=sorted(CONFIGS), default="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--n-pool", type=int, default=2000, help="synthetic PT pool size")
    p.add_argument("--n-test", type=int, default=1000, help="synthetic test set size")
    p.add_argument("--generator", type=int, choices=VERSIONS, default=3,
                   help="synthetic generator version (1: the previous one)")
    p.add_argument("--meta-n", type=int, default=50, help="|D_FT(Meta)| for meta_simclr_partial")
    p.add_argument("--time-ratio", type=int, default=0, metavar="OUTER",
                   help="also time OUTER outer iterations with meta=False vs meta=True")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-only", action="store_true",
                   help="only tabulate the finished runs in --out (compute nothing)")
    return p


def _pt_result(key: str, out: Path, method: str, task: Task, cfg: ECGConfig, seed: int,
               meta_sets, progress: bool, pool_strengths=None) -> dict[str, Any]:
    path = out / "pt" / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    res = pretrain(method, task.x[task.pt_idx], cfg, seed, meta_sets=meta_sets,
                   checkpoint=out / "ckpt" / f"{key}.pt", progress=progress,
                   probe=task.x_test[:PROBE], pool_strengths=pool_strengths)
    if res["phi"] is not None:
        res["strengths"] = _strength_report(res["phi"], task, cfg, res.get("phi_buffers"))
        if task.group_test is not None and res["probe_strengths"]:
            g = task.group_test[:PROBE]
            traj = np.asarray(res["probe_strengths"])
            res["strengths"]["trajectory_by_group"] = {
                name: traj[:, g == i].mean(1).tolist() for i, name in enumerate(GROUPS)}
    atomic_save(res, path)
    return res


def _strength_report(phi_params, task: Task, cfg: ECGConfig, buffers=None) -> dict[str, Any]:
    from models.ecg_phi import WarpStrengthNet

    phi = WarpStrengthNet(task.x.shape[1], cfg.phi_channels, init_strength=cfg.warp,
                          max_strength=cfg.warp_max).to(task.x.dtype)
    for k, v in (buffers or {}).items():  # phi's fixed feature standardisation
        phi.get_buffer(k).copy_(v)
    s = phi_strengths(phi, phi_params, task.x_test).numpy()
    rep: dict[str, Any] = {"all": float(s.mean()), "init": cfg.warp}
    if task.group_test is not None:
        rep["by_group"] = {g: float(s[task.group_test == i].mean()) for i, g in enumerate(GROUPS)}
        rep["values_by_group"] = {g: s[task.group_test == i].tolist() for i, g in enumerate(GROUPS)}
    y = task.y_test.numpy()
    rep["by_label"] = {name: float(s[y[:, j] == 1].mean()) if (y[:, j] == 1).any() else None
                       for j, name in enumerate(task.label_names)}
    rep["no_label"] = float(s[y.sum(1) == 0].mean()) if (y.sum(1) == 0).any() else None
    return rep


def run_one(method: str, n: int, seed: int, f: int, task: Task, cfg: ECGConfig, out: Path,
            meta_n: int, progress: bool) -> dict[str, Any] | None:
    key = f"{method}_n{n}_s{seed}_f{f}"
    path = out / "runs" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    tr, va = task.ft_split(n, seed)
    pt: dict[str, Any] | None = None
    if method == "simclr":
        pt = _pt_result(f"simclr_s{seed}", out, "simclr", task, cfg, seed, None, progress)
    elif method == "simclr_nowarp":  # the authors' SimCLR baseline: crop + jitter only
        pt = _pt_result(f"simclr_nowarp_s{seed}", out, "simclr", task,
                        with_overrides(cfg, warp=0.0), seed, None, progress)
    elif method == "simclr_oracle":  # synthetic only: the per-group strengths phi should find
        if task.group is None:
            raise SystemExit("--method simclr_oracle needs ground-truth groups (--synthetic)")
        timing = torch.from_numpy(task.group[task.pt_idx] == GROUPS.index("timing"))
        s = torch.where(timing, 0.0, float(cfg.warp))
        pt = _pt_result(f"simclr_oracle_s{seed}", out, "simclr", task, cfg, seed, None, progress,
                        pool_strengths=s)
    elif method in ("meta_simclr", "meta_simclr_partial"):
        if method == "meta_simclr_partial":
            if meta_n >= n:
                return None
            m_tr = int(0.8 * meta_n)
            mtr, mva, pkey = tr[:m_tr], va[: meta_n - m_tr], f"{method}_n{n}_m{meta_n}_s{seed}"
        else:
            mtr, mva, pkey = tr, va, f"{method}_n{n}_s{seed}"
        sets = ((task.x[mtr], task.y[mtr]), (task.x[mva], task.y[mva]))
        pt = _pt_result(pkey, out, "meta_simclr", task, cfg, seed, sets, progress)
    t0 = time.perf_counter()
    res = finetune(None if pt is None else pt["enc_state"], (task.x[tr], task.y[tr]),
                   (task.x[va], task.y[va]), (task.x_test, task.y_test), cfg, 1000 * seed + f)
    res.update(method=method, n_ft=n, seed=seed, ft_seed=f, ft_time=time.perf_counter() - t0,
               n_train=len(tr), n_val=len(va))
    if pt is not None:
        res.update(pt_wall_time=pt["wall_time"], pt_meta_steps=pt["meta_steps"],
                   pt_outer=pt["outer_iterations"])
        if pt.get("strengths"):
            res["strengths"] = {k: v for k, v in pt["strengths"].items() if k != "values_by_group"}
    write_json(path, res)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    methods = list(METHODS) if args.method == "all" else args.method.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--method: unknown {bad}; choose from {METHODS}")
    ns = _parse_ints(args.n_ft, "--n-ft")
    if args.seeds < 1 or args.ft_seeds < 1:
        raise SystemExit("--seeds and --ft-seeds must be >= 1")
    torch.set_num_threads(max(1, args.threads))
    seed_everything(0)
    cfg = _config(args.config, args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # finished runs, PT results and the time ratio are reused by file name: refuse an --out
    # holding them for other settings (data, generator, config, partial-access size)
    check_settings(out, {"config": asdict(cfg),
                         "data": "synthetic" if args.synthetic else str(args.data_dir),
                         "generator": args.generator if args.synthetic else None,
                         "n_pool": args.n_pool if args.synthetic else None,
                         "n_test": args.n_test if args.synthetic else None,
                         "labels": None if args.synthetic else args.labels,
                         "meta_n": args.meta_n}, "runs/*.json")
    task = (synthetic_task(args.n_pool, args.n_test, version=args.generator) if args.synthetic
            else ptbxl_task(args.data_dir, args.labels, args.cache))
    rank, _ = launch_rank()
    if rank == 0:
        plot_augmentations(task.x[int(task.pt_idx[0])], out / "augmentations.png",
                           crop=cfg.crop, noise=cfg.noise, warps=(cfg.warp, cfg.warp_max),
                           sigma=cfg.warp_sigma)

    def jobs(seeds: list[int]) -> list[tuple[str, int, int, int]]:
        return [(m, n, s, f) for s in seeds for n in ns for m in methods
                for f in range(args.ft_seeds)]

    def run_seeds(seeds: list[int]) -> None:
        """Every job of these PT seeds (one rank's share under torchrun); each writes its JSON
        and a seed's PT checkpoints are only touched by the rank that owns the seed."""
        from tqdm.auto import tqdm

        for m, n, s, f in tqdm(jobs(seeds), desc="ECG runs",
                               disable=args.no_progress or rank != 0):
            run_one(m, n, s, f, task, cfg, out, args.meta_n, not args.no_progress and rank == 0)

    def aggregate() -> dict[str, Any] | None:
        results = []
        for m, n, s, f in jobs(list(range(args.seeds))):
            path = out / "runs" / f"{m}_n{n}_s{s}_f{f}.json"
            if path.exists():  # (meta_simclr_partial with meta_n >= n has no run)
                results.append(json.loads(path.read_text()))
        ratio = None
        if args.time_ratio or (out / "time_ratio.json").exists():
            ratio = (json.loads((out / "time_ratio.json").read_text()) if args.summary_only
                     else time_ratio(task, cfg, ns[0], args.time_ratio, out))
        summary = summarize(results, task, out, argv, cfg, ratio)
        pts = sorted((out / "pt").glob("meta_simclr_n*.pt")) if (out / "pt").exists() else []
        if pts and task.group_test is not None:
            vals = torch.load(pts[-1], weights_only=False)["strengths"]["values_by_group"]
            plot_strengths(vals, out / "strengths.png")
        return summary

    # under torchrun: seed parallel (rank r runs PT seeds r, r+N, ...), rank 0 aggregates
    if args.summary_only:
        summary = aggregate() if rank == 0 else None
    else:
        summary = seed_parallel(run_seeds, list(range(args.seeds)), aggregate)
    if rank != 0:
        return 0
    print((out / "results.md").read_text())
    return 0 if summary else 1
