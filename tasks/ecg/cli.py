"""``python -m tasks ecg``: No PT / SimCLR / Meta SimCLR on PTB-XL or the synthetic stand-in.

Example (the synthetic validation of tasks/ecg/RESULTS.md: every seed on its own synthetic data,
the per-seed tables, strengths and time ratio exported with the command line)::

    python -m tasks ecg --method no_pt,simclr_nowarp,simclr,simclr_oracle,meta_simclr \\
        --n-ft 100,250,500 --vary-data --seeds 0-9 --time-ratio 5 --out runs/ecg_v \\
        --export tasks/ecg/results/validation.json

Resumable: every fine-tuning result is a JSON file under ``OUT/runs`` and every pre-training
result a file under ``OUT/pt``; finished ones are skipped, and an interrupted pre-training
resumes from its ``hg.MetaPretrainer`` checkpoint under ``OUT/ckpt``.

Under ``torchrun --nproc-per-node N`` (same flags) the PT seeds are split over the ranks (rank r
runs seeds r, r+N, ... with all their methods and |D_FT| values); rank 0 then writes the table,
the plots and the time ratio.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.cli import Experiment, Job
from tasks.common import atomic_save, launch_rank, seed_everything, seed_parallel, write_json
from tasks.ecg.export import export
from tasks.ecg.methods import CONFIGS, ECGConfig, finetune, phi_strengths, pretrain, with_overrides
from tasks.ecg.plots import plot_augmentations, plot_strengths
from tasks.ecg.report import METHODS, summarize
from tasks.ecg.synthetic import GROUPS
from tasks.ecg.task import Task, ptbxl_task, synthetic_task
from tasks.harness import CLIError, cached, load_file, read_json, time_ratio
from tasks.results_table import plumbing_title

__all__ = ["METHODS", "EXPERIMENTS", "run_one", "measure_time_ratio"]
PROBE = 300  # test examples whose strengths are logged after every meta step


def _parse_ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise CLIError(f"{name} must be positive integers, got {text!r}")
    return vals


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="no_pt,simclr,meta_simclr",
                   help=f"comma-separated subset of {','.join(METHODS)} or 'all'")
    p.add_argument("--n-ft", default="100,250,500", help="|D_FT| values (comma-separated)")
    p.add_argument("--ft-seeds", type=int, default=1, help="FT seeds per PT seed")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-dir", help="PTB-XL directory (ptbxl_database.csv, records100/)")
    src.add_argument("--synthetic", action="store_true",
                     help="the synthetic 12-lead stand-in (the default without --data-dir)")
    p.add_argument("--labels", choices=("paper", "benchmark"), default="paper")
    p.add_argument("--cache", help="npz cache of the PTB-XL signals")
    p.add_argument("--n-pool", type=int, default=2000, help="synthetic PT pool size")
    p.add_argument("--n-test", type=int, default=1000, help="synthetic test set size")
    p.add_argument("--meta-n", type=int, default=50, help="|D_FT(Meta)| for meta_simclr_partial")
    p.add_argument("--vary-data", action="store_true",
                   help="seed k also draws the synthetic PT pool (generator seed 20000 + 2k) and "
                        "test set (20001 + 2k); otherwise one pool and test set for every seed")
    p.add_argument("--export", metavar="JSON",
                   help="also write the per-seed tables, strengths and time ratio with this "
                        "command line to JSON (what tasks/ecg/RESULTS.md renders)")
    p.add_argument("--time-ratio", type=int, default=0, metavar="OUTER",
                   help="also time OUTER outer iterations of Meta SimCLR vs plain PT (3 repeats)")
    p.add_argument("--summary-only", action="store_true",
                   help="only tabulate the finished runs in --out (compute nothing)")


def _prepare(job: Job) -> None:
    a = job.args
    a.methods = list(METHODS) if a.method == "all" else [m for m in a.method.split(",") if m]
    bad = [m for m in a.methods if m not in METHODS]
    if bad or not a.methods:
        raise CLIError(f"--method: unknown {bad}; choose from {', '.join(METHODS)} or 'all'")
    a.ns = _parse_ints(a.n_ft, "--n-ft")
    for name in ("ft_seeds", "n_pool", "n_test", "meta_n"):
        if getattr(a, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.time_ratio < 0:
        raise CLIError(f"--time-ratio must be >= 0, got {a.time_ratio}")
    if a.data_dir is not None:
        if not Path(a.data_dir).is_dir():
            raise CLIError(f"--data-dir {a.data_dir}: no such folder")
        if "simclr_oracle" in a.methods:
            raise CLIError("--method simclr_oracle needs ground-truth groups (the synthetic "
                           "stand-in, no --data-dir)")
        if a.vary_data:
            raise CLIError("--vary-data applies to the synthetic stand-in only: drop it or "
                           "--data-dir")


def _settings(job: Job) -> dict[str, Any]:
    a = job.args
    synthetic = a.data_dir is None
    return {"data": "synthetic" if synthetic else str(a.data_dir),
            "n_pool": a.n_pool if synthetic else None, "n_test": a.n_test if synthetic else None,
            "labels": None if synthetic else a.labels, "meta_n": a.meta_n,
            **({"vary_data": True} if a.vary_data else {})}


def data_seed(seed: int, vary_data: bool) -> int:
    """The synthetic generator seed of run seed ``seed``: the pool's (the test set's is this
    + 1). Without ``--vary-data`` every seed shares pool 12345 / test 12346."""
    return 20000 + 2 * seed if vary_data else 12345


def _pt_result(key: str, out: Path, method: str, task: Task, cfg: ECGConfig, seed: int,
               meta_sets, progress: bool, pool_strengths=None) -> dict[str, Any]:
    path = out / "pt" / f"{key}.pt"
    if path.exists():
        return load_file(path, map_location=task.x.device)
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
                          max_strength=cfg.warp_max).to(task.x.device, task.x.dtype)
    for k, v in (buffers or {}).items():  # phi's fixed feature standardisation
        phi.get_buffer(k).copy_(v)
    s = phi_strengths(phi, phi_params, task.x_test).cpu().numpy()
    rep: dict[str, Any] = {"all": float(s.mean()), "init": cfg.warp}
    if task.group_test is not None:
        rep["by_group"] = {g: float(s[task.group_test == i].mean()) for i, g in enumerate(GROUPS)}
        rep["values_by_group"] = {g: s[task.group_test == i].tolist() for i, g in enumerate(GROUPS)}
    y = task.y_test.cpu().numpy()
    rep["by_label"] = {name: float(s[y[:, j] == 1].mean()) if (y[:, j] == 1).any() else None
                       for j, name in enumerate(task.label_names)}
    rep["no_label"] = float(s[y.sum(1) == 0].mean()) if (y.sum(1) == 0).any() else None
    return rep


def run_one(method: str, n: int, seed: int, f: int, task: Task, cfg: ECGConfig, out: Path,
            meta_n: int, progress: bool) -> dict[str, Any] | None:
    key = f"{method}_n{n}_s{seed}_f{f}"
    path = out / "runs" / f"{key}.json"
    if path.exists():
        return read_json(path)
    tr, va = task.ft_split(n, seed)
    pt: dict[str, Any] | None = None
    if method == "simclr":
        pt = _pt_result(f"simclr_s{seed}", out, "simclr", task, cfg, seed, None, progress)
    elif method == "simclr_nowarp":  # the authors' SimCLR baseline: crop + jitter only
        pt = _pt_result(f"simclr_nowarp_s{seed}", out, "simclr", task,
                        with_overrides(cfg, warp=0.0), seed, None, progress)
    elif method == "simclr_oracle":  # synthetic only: the per-group strengths phi should find
        timing = torch.from_numpy(task.group[task.pt_idx] == GROUPS.index("timing"))
        timing = timing.to(task.x.device)
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
               n_train=len(tr), n_val=len(va), data_seed=task.data_seed)
    if pt is not None:
        res.update(pt_wall_time=pt["wall_time"], pt_meta_steps=pt["meta_steps"],
                   pt_outer=pt["outer_iterations"])
        if pt.get("strengths"):
            res["strengths"] = {k: v for k, v in pt["strengths"].items() if k != "values_by_group"}
    write_json(path, res)
    return res


def run(job: Job) -> dict[str, Any] | None:
    a, cfg, out = job.args, job.cfg, job.out
    seed_everything(0)
    synthetic = a.data_dir is None
    tasks: dict[int, Task] = {}

    def task_of(seed: int) -> Task:
        """Seed ``seed``'s data: its own pool and test set under --vary-data, else one shared
        task (built once; the last varied one is kept, so memory holds at most two)."""
        key = data_seed(seed, a.vary_data)
        if key not in tasks:
            if a.vary_data:
                tasks.clear()
            tasks[key] = (synthetic_task(a.n_pool, a.n_test, key) if synthetic
                          else ptbxl_task(a.data_dir, a.labels, a.cache)).to(job.device)
        return tasks[key]

    task = task_of(job.seeds[0])
    rank, _ = launch_rank()
    progress = job.progress and rank == 0
    if rank == 0:
        plot_augmentations(task.x[int(task.pt_idx[0])].cpu(), out / "augmentations.png",
                           crop=cfg.crop, noise=cfg.noise, warps=(cfg.warp, cfg.warp_max),
                           sigma=cfg.warp_sigma)

    def jobs(seeds: list[int]) -> list[tuple[str, int, int, int]]:
        return [(m, n, s, f) for s in seeds for n in a.ns for m in a.methods
                for f in range(a.ft_seeds)]

    def run_seeds(seeds: list[int]) -> None:
        """Every job of these PT seeds (one rank's share under torchrun); each writes its JSON
        and a seed's PT checkpoints are only touched by the rank that owns the seed."""
        from tqdm.auto import tqdm

        for m, n, s, f in tqdm(jobs(seeds), desc="ECG runs", disable=not progress):
            run_one(m, n, s, f, task_of(s), cfg, out, a.meta_n, progress)

    def aggregate() -> dict[str, Any]:
        results = []
        for m, n, s, f in jobs(job.seeds):
            path = out / "runs" / f"{m}_n{n}_s{s}_f{f}.json"
            if path.exists():  # (meta_simclr_partial with meta_n >= n has no run)
                results.append(read_json(path))
        ratio = None
        rpath = out / "time_ratio.json"
        if a.time_ratio and not a.summary_only:
            ratio = cached(rpath, lambda: measure_time_ratio(task, cfg, a.ns[0], a.time_ratio))
        elif rpath.exists():
            ratio = read_json(rpath)
        plumbing = a.config == "smoke"
        summary = summarize(results, task, out, job.argv, cfg, ratio, plumbing)
        values = _strength_values(out, a.ns, job.seeds) if task.group_test is not None else {}
        if values:
            plot_strengths(values, out / "strengths.png", max_strength=cfg.warp_max,
                           init=cfg.warp, title=plumbing_title(
                               "ECG (synthetic): Meta SimCLR's learned warp strengths", plumbing))
        if a.export:
            spread = {}
            for (n, s), by_group in values.items():
                spread.setdefault(n, {})[s] = float(np.concatenate(
                    [np.asarray(v) for v in by_group.values()]).std())
            export(a.export, results, job.argv, cfg=cfg, plumbing=plumbing,
                   settings=_settings(job), ratio=ratio, within_run_std=spread,
                   data_seeds={s: data_seed(s, a.vary_data) if synthetic else None
                               for s in job.seeds})
            stem = Path(a.export).with_suffix("")  # the figures RESULTS.md shows, beside it
            for name in ("auroc_vs_nft", "strengths"):
                if (out / f"{name}.png").exists():
                    shutil.copyfile(out / f"{name}.png", f"{stem}_{name}.png")
        return summary

    # under torchrun: seed parallel (rank r runs PT seeds r, r+N, ...), rank 0 aggregates
    if a.summary_only:
        return aggregate() if rank == 0 else None
    return seed_parallel(run_seeds, job.seeds, aggregate)


def _strength_values(out: Path, ns: list[int], seeds: list[int]
                     ) -> dict[tuple[int, int], dict[str, list[float]]]:
    """Per-example test strengths by group of every finished Meta SimCLR pre-training of
    these N and seeds: ``{(n, seed): {group: values}}``."""
    values = {}
    for n in ns:
        for s in seeds:
            path = out / "pt" / f"meta_simclr_n{n}_s{s}.pt"
            if path.exists():
                rep = load_file(path)["strengths"]
                if "values_by_group" in rep:
                    values[(n, s)] = rep["values_by_group"]
    return values


def measure_time_ratio(task: Task, cfg: ECGConfig, n: int, outer: int) -> dict[str, Any]:
    """``outer`` outer iterations of Meta SimCLR's loop with meta=False vs meta=True (same
    loss, data and phi network; the whole pre-training call is timed)."""
    tr, va = task.ft_split(n, 0)
    sets = ((task.x[tr], task.y[tr]), (task.x[va], task.y[va]))
    cfg0 = with_overrides(cfg, warmup=0)

    def make(meta: bool):
        return lambda: pretrain("meta_simclr", task.x[task.pt_idx], cfg0, 0, meta_sets=sets,
                                meta=meta, outer=outer, progress=False)

    return time_ratio(make, device=task.x.device, outer=outer, P=cfg.P, K=cfg.K,
                      neumann_terms=cfg.neumann_terms)


def _summary(summary: dict[str, Any]) -> str:
    return (Path(summary["out"]) / "results.md").read_text().rstrip()


EXPERIMENTS = {"ecg": Experiment(
    task="ecg", name="ecg", description=__doc__.split("\n")[0], configs=CONFIGS,
    default_config="default", run=run, summary=_summary, methods=METHODS, default_seeds="3",
    runs_glob=("runs/*.json", "pt/*", "ckpt/*", "time_ratio.json"), add_arguments=_arguments,
    prepare=_prepare, settings=_settings,
    default_out=lambda c: f"runs/ecg_{c}")}
