"""``python -m tasks ppi``: run PT methods x seeds x access protocols, write results and plots.

Example (the synthetic validation of RESULTS.md; without ``--data-dir`` the synthetic
stand-in is generated into ``OUT/data``)::

    python -m tasks ppi --method all --access both --seeds 3 --config synthetic \\
        --out runs/ppi_synthetic

Each (method, protocol, fold, seed) writes ``OUT/runs/<name>.json`` and is skipped when that
file exists (resumable); PT checkpoints live in ``OUT/ckpt/`` (Meta-PT / Graph Sup PT resume
mid-run through ``hg.MetaPretrainer`` checkpoints). After the runs, ``OUT/results.json``,
``OUT/results.md`` and the PNG plots are (re)built from every finished run in ``OUT/runs``.

Under ``torchrun --nproc-per-node N`` (same flags) Graph Sup PT and Meta-PT are data parallel:
each rank takes 1/N of every PT and meta batch, losses go through
``hypergrad.distributed.data_parallel`` and BatchNorm through ``SyncBatchNorm``, so every meta
step equals the single-process one on the global batch. The other methods and the FT protocol
run identically on every rank; rank 0 alone writes files and shows progress.
"""

from __future__ import annotations

import argparse
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from hypergrad import distributed as hd
from tasks.cli import Experiment, Job
from tasks.common import mean_std, seed_everything, write_json
from tasks.harness import CLIError, environment, read_json, time_ratio
from tasks.results_table import plumbing_title
from tasks.tables import compare, fmt_paired

from .config import CONFIGS, METHODS, Settings
from .data import load_ppi
from .finetune import Problem, finetune, macro, make_problem
from .methods import pretrain
from .net import build_trainer

__all__ = ["EXPERIMENTS", "run_all", "aggregate"]

FIVE = METHODS[:5]
# Δ column: vs the strongest of these
BASELINES = ("no_pt", "graph_sup_pt", "cotrain", "cotrain_pcgrad", "corr_pt")
PLUMBING_CONFIGS = ("smoke",)  # tables and plots say "plumbing check: not a result"
FOLD_FREE = ("no_pt", "graph_sup_pt")  # PT does not see FT labels: one run serves all folds
MODES = ("full", "linear")
STAND_INS = ("labels", "structure")


def _methods(arg: str) -> list[str]:
    names = list(FIVE) if arg == "all" else [m.strip() for m in arg.split(",") if m.strip()]
    names = [n for m in names for n in (FIVE if m == "all" else [m])]
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise CLIError(f"--method: unknown {bad}; choose from {', '.join(METHODS)} or 'all'")
    return list(dict.fromkeys(names))


def _run_one(method: str, problem: Problem, s: Settings, seed: int, fold: int | None,
             out: Path, progress: bool) -> dict[str, Any]:
    seed_everything(seed)
    tag = f"{method}__{'shared' if fold is None else f'f{fold}'}__s{seed}"
    t0 = time.perf_counter()
    res = pretrain(method, problem, s, seed, fold, out / "ckpt" / f"{tag}.pt", progress)
    pt_time = time.perf_counter() - t0
    ft = {mode: finetune(res.encoder, problem, s, mode, seed) for mode in MODES}
    rec: dict[str, Any] = {
        "method": method, "fold": fold, "seed": seed, "ft": ft, "pt_info": res.info,
        "pt_wall_time": pt_time, "weights": res.weights,
        "heldout_tasks": None if fold is None else problem.folds[fold].tolist(),
    }
    if res.weights is not None and problem.relevance is not None:
        rec["weight_relevance_auroc"] = float(roc_auc_score(problem.relevance, res.weights))
    return rec


def run_all(methods: list[str], access: str, seeds: list[int], problem: Problem, s: Settings,
            out: Path, progress: bool = True) -> None:
    """Run every missing (method, fold, seed); fold None = full access (and fold-free PT)."""
    jobs = []
    for seed in seeds:
        for m in methods:
            folds: list[int | None] = []
            if access in ("full", "both") or m in FOLD_FREE:
                folds.append(None)
            if access in ("partial", "both") and m not in FOLD_FREE:
                folds += list(range(len(problem.folds)))
            jobs += [(m, f, seed) for f in folds]
    from tqdm.auto import tqdm

    def path(m: str, f: int | None, seed: int) -> Path:
        return out / "runs" / f"{m}__{'shared' if f is None else f'f{f}'}__s{seed}.json"

    # decided once, before anyone writes: under torchrun every rank runs the same jobs in the
    # same order (their collectives must match), and only rank 0 writes
    todo = [j for j in jobs if not path(*j).exists()]
    hd.barrier()
    for m, f, seed in tqdm(todo, desc="ppi runs", disable=not (progress and hd.is_main())):
        rec = _run_one(m, problem, s, seed, f, out, progress and hd.is_main())
        if hd.is_main():
            write_json(path(m, f, seed), rec)


def _scores(rec: dict[str, Any], tasks: list[int] | None, split: str = "test_hard"):
    """AUROC (macro over ``tasks``) for each FT mode and for the mode chosen on validation."""
    val = {m: macro(rec["ft"][m]["valid"]) for m in MODES}
    best = max(MODES, key=lambda m: val[m])
    out = {m: macro(rec["ft"][m][split], tasks) for m in MODES}
    out["best"] = out[best]
    return out


def aggregate(out: Path, folds: list[list[int]]) -> dict[str, Any]:
    """Table over seeds from every run file: full and partial access, both FT modes."""
    recs = [read_json(p) for p in sorted((out / "runs").glob("*.json"))]
    table: dict[str, Any] = {}
    for m in METHODS:
        mine = [r for r in recs if r["method"] == m]
        if not mine:
            continue
        row: dict[str, Any] = {}
        seeds = sorted({r["seed"] for r in mine})
        for access in ("full", "partial"):
            per_seed: dict[str, list[float]] = {k: [] for k in (*MODES, "best", "easy")}
            done: list[int] = []
            for sd in seeds:
                if access == "full":
                    rs = [(r, None) for r in mine if r["seed"] == sd and r["fold"] is None]
                elif m in FOLD_FREE:
                    rs = [(r, folds[f]) for r in mine if r["seed"] == sd and r["fold"] is None
                          for f in range(len(folds))]
                else:
                    rs = [(r, r["heldout_tasks"]) for r in mine
                          if r["seed"] == sd and r["fold"] is not None]
                if not rs or (access == "partial" and len(rs) != len(folds)):
                    continue
                done.append(sd)
                sc = [_scores(r, t) for r, t in rs]
                for k in (*MODES, "best"):
                    per_seed[k].append(float(np.mean([x[k] for x in sc])))
                per_seed["easy"].append(float(np.mean([_scores(r, t, "test_easy")["best"]
                                                       for r, t in rs])))
            if per_seed["best"]:
                row[access] = {k: {"mean": mean_std(v)[0], "std": mean_std(v)[1], "values": v}
                               for k, v in per_seed.items()}
                row[access].update(n_seeds=len(done), seeds=done)
        wa = [r["weight_relevance_auroc"] for r in mine
              if "weight_relevance_auroc" in r and r["fold"] is None]
        if wa:
            row["weight_relevance_auroc"] = {"mean": mean_std(wa)[0], "std": mean_std(wa)[1],
                                             "values": wa}
        info = [r["pt_info"] for r in mine if r["pt_info"]]
        if info and "pt_step_time" in info[0]:
            row["timing"] = {k: float(np.mean([i[k] for i in info])) for k in
                             ("pt_step_time", "meta_step_time", "total_time")}
        table[m] = row
    return table


def _fmt(c: dict[str, Any] | None, key: str) -> str:
    if not c:
        return "-"
    return f"{100 * c[key]['mean']:.1f} +- {100 * c[key]['std']:.1f}"


def paired_rows(table: dict[str, Any], access: str = "full") -> dict[str, dict[str, Any]]:
    """FT-mode-chosen-on-val AUROC of ``access``, each method paired against the strongest of
    :data:`BASELINES` on the shared seeds (95% t-interval, n)."""
    per = {m: dict(zip(r[access]["seeds"], r[access]["best"]["values"]))
           for m, r in table.items() if access in r}
    return compare(per, baselines=BASELINES)


def write_tables(out: Path, table: dict[str, Any], header: str) -> None:
    """results.json and results.md (AUROC x 100, mean +- std over seeds, paired differences)."""
    pr = {a: paired_rows(table, a) for a in ("full", "partial")}
    base = {a: next((m for m, r in pr[a].items() if r["baseline"]), "-") for a in pr}
    for a, rows in pr.items():
        for m, r in rows.items():
            table[m][a]["paired"] = {"baseline": base[a], **r.get("paired", {})}
    write_json(out / "results.json", table)
    lines = [header, "",
             "| method | full: best (val) | full: FT all | full: linear | partial: best (val) "
             "| partial: FT all | partial: linear | seeds | weight-relevance AUROC "
             f"| full: Δ vs {base['full']} [95% t-CI] (n) "
             f"| partial: Δ vs {base['partial']} [95% t-CI] (n) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, row in table.items():
        d = [("baseline (strongest)" if pr[a][m]["baseline"]
              else fmt_paired(pr[a][m].get("paired"), 100)) if m in pr[a] else "-"
             for a in ("full", "partial")]
        f, p = row.get("full"), row.get("partial")
        n = "/".join(str(x["n_seeds"]) for x in (f, p) if x)
        wa = row.get("weight_relevance_auroc")
        was = f"{wa['mean']:.3f} +- {wa['std']:.3f}" if wa else "-"
        lines.append(f"| {m} | {_fmt(f, 'best')} | {_fmt(f, 'full')} | {_fmt(f, 'linear')} | "
                     f"{_fmt(p, 'best')} | {_fmt(p, 'full')} | {_fmt(p, 'linear')} | {n} | {was} | "
                     f"{d[0]} | {d[1]} |")
    tim = {m: r["timing"] for m, r in table.items() if "timing" in r}
    if tim:
        lines += ["", "Wall-clock times recorded inside the runs (all runs of the method; on a "
                  "shared machine they vary with its load: compare costs with --time-ratio):", "",
                  "| method | PT step (s) | meta step (s) | PT-stage wall time (s) |",
                  "|---|---|---|---|"]
        lines += [f"| {m} | {t['pt_step_time']:.4f} | {t['meta_step_time']:.4f} | "
                  f"{t['total_time']:.1f} |" for m, t in tim.items()]
    tpath = out / "time_ratio.json"
    if tpath.exists():
        t = read_json(tpath)
        pt_step = min(t["plain_seconds"]) / (t["outer"] * t["P"])
        meta_step = (min(t["meta_seconds"]) - min(t["plain_seconds"])) / t["outer"]
        lines += ["", f"Meta-PT / plain PT time ({t['outer']} outer iterations of P = {t['P']}, "
                  f"interleaved, {t['repeats']} repeats): {t['ratio']:.2f}x (min wall time; "
                  f"median {t['ratio_median']:.2f}x, CPU {t['cpu_ratio']:.2f}x); plain PT step "
                  f"{1e3 * pt_step:.1f} ms, meta step {1e3 * meta_step:.1f} ms = "
                  f"{meta_step / pt_step:.2f} PT steps."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def measure_time_ratio(problem: Problem, s: Settings, outer: int) -> dict[str, Any]:
    """Graph Sup PT's loop (``meta=False``) vs Meta-PT's, ``outer`` outer iterations each."""
    def make(meta: bool):
        tr, pb, fb = build_trainer(problem, s, 0, None, meta=meta)
        return lambda: tr.run(outer, pb, fb, progress=False)

    return time_ratio(make, device=problem.store.device, outer=outer, P=s.P, K=s.K,
                      world_size=hd.world_size())


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="all",
                   help=f"comma list of {', '.join(METHODS)}, or 'all' (the five of Table 1)")
    p.add_argument("--access", default="full", choices=("full", "partial", "both"))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-dir", help="Hu et al.'s dataset/supervised folder (or the .pt file)")
    src.add_argument("--synthetic", action="store_true",
                     help="the synthetic stand-in (the default without --data-dir)")
    p.add_argument("--stand-in", choices=STAND_INS, default="labels",
                   help="synthetic stand-in: PT relevance visible in the labels (labels) or only "
                        "through shared graph structure (structure, tasks/ppi/synthetic_latent.py)")
    p.add_argument("--vary-data", action="store_true",
                   help="seed k also generates the stand-in with generator seed k "
                        "(OUT/data/s<k>); otherwise one stand-in from the config's seed")
    p.add_argument("--export", metavar="JSON",
                   help="also write the paired tables and weight AUROCs with this command line "
                        "to JSON (what tasks/ppi/RESULTS.md renders)")
    p.add_argument("--time-ratio", type=int, default=0, metavar="OUTER",
                   help="also time OUTER outer iterations of Meta-PT vs plain PT (3 repeats)")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="under torchrun: seconds a collective waits for a slow or dead rank")


def _prepare(job: Job) -> None:
    job.args.methods = _methods(job.args.method)
    if job.args.data_dir is not None and not Path(job.args.data_dir).exists():
        raise CLIError(f"--data-dir {job.args.data_dir}: no such file or folder")
    if job.args.data_dir is not None and (job.args.vary_data or job.args.stand_in != "labels"):
        raise CLIError("--vary-data and --stand-in apply to the synthetic stand-in only: drop "
                       "them or --data-dir")
    if job.args.time_ratio < 0:
        raise CLIError(f"--time-ratio must be >= 0, got {job.args.time_ratio}")
    if job.device.type != "cpu" and hd.world_size() > 1:
        raise CLIError("under torchrun the PPI task runs on the CPU (gloo): use --device cpu")


def _settings(job: Job) -> dict[str, Any]:
    if job.args.data_dir is not None:
        return {"data": str(job.args.data_dir)}
    return {"data": "synthetic", "stand_in": job.args.stand_in, "vary_data": job.args.vary_data}


def _synthetic_problem(s: Settings, stand_in: str, root: Path, seed: int | None,
                       device: torch.device) -> Problem:
    """The stand-in (generator seed ``seed``, or the config's) written to ``root`` and loaded;
    every rank writes the same deterministic files (atomic renames of per-process temp files),
    so no rank waits on another's generation time."""
    from .synthetic import read_meta, write_synthetic
    from .synthetic_latent import LatentConfig, write_latent

    syn = s.synthetic if seed is None else replace(s.synthetic, seed=seed)
    if stand_in == "structure":
        root = write_latent(root, LatentConfig(**{k: getattr(syn, k)
                                                  for k in syn.__dataclass_fields__}))
    else:
        root = write_synthetic(root, syn)
    store = load_ppi(root)
    store.device = device
    return make_problem(store, s, read_meta(root)["relevance"])


def run(job: Job) -> dict[str, Any] | None:
    args, s, out = job.args, job.cfg, job.out
    # no-op outside torchrun; gloo because the task runs on the CPU under torchrun
    hd.init(backend="gloo", timeout_s=args.dist_timeout)
    def build(seed: int | None) -> Problem:
        try:
            if args.data_dir is not None:
                store = load_ppi(args.data_dir)
                store.device = job.device
                return make_problem(store, s, None)
            root = out / "data" if seed is None else out / "data" / f"s{seed}"
            return _synthetic_problem(s, args.stand_in, root, seed, job.device)
        except ValueError as e:  # the data do not fit the config (e.g. ft_train_size)
            raise CLIError(str(e).splitlines()[0]) from None

    # one problem for every seed, or (--vary-data) one per seed, built when its seeds run
    groups = [(k, [k]) for k in job.seeds] if args.vary_data else [(None, job.seeds)]
    problem = build(groups[0][0])
    s = s.for_data(problem.split.pretrain.numel())
    if hd.is_main():
        write_json(out / "problem.json", {"settings": s.to_dict(), "split": problem.split.sizes(),
                                          "ft_train": problem.ft_train.numel()})
    for i, (key, seeds) in enumerate(groups):
        prob = problem if i == 0 else build(key)
        run_all(args.methods, args.access, seeds, prob, s.for_data(prob.split.pretrain.numel()),
                out, job.progress)
    ratio_path = out / "time_ratio.json"
    todo = args.time_ratio > 0 and not ratio_path.exists()
    hd.barrier()  # every rank decided before rank 0 writes (their collectives must match)
    if todo:
        t = measure_time_ratio(problem, s, args.time_ratio)
        if hd.is_main():
            write_json(ratio_path, t)
    main_rank = hd.is_main()  # read before shutdown: without a group every rank reads as 0
    hd.shutdown()  # the collective work is done; rank 0 aggregates and plots alone
    if not main_rank:
        return None
    table = aggregate(out, [f.tolist() for f in problem.folds])
    src = "synthetic stand-in" if args.data_dir is None else f"data {args.data_dir}"
    plumbing = args.config in PLUMBING_CONFIGS
    write_tables(out, table, plumbing_title(
        f"PPI ({src}, config {args.config}): test AUROC x 100 (hard half of the test species), "
        "mean +- std over seeds", plumbing))
    from .plots import plot_all

    plot_all(out, table, plumbing)
    if args.export:
        export(Path(args.export), table, job, s, out)
    return {"out": str(out)}


def export(path: Path, table: dict[str, Any], job: Job, s: Settings, out: Path) -> None:
    """The JSON that tasks/ppi/RESULTS.md renders: per access protocol a ``paired_spec`` (test
    AUROC, FT mode chosen on validation, per seed), weight-relevance AUROCs per seed, the
    settings, the time ratio and the package versions, with the command line that wrote it."""
    from tasks.paired_table import paired_spec

    specs = {}
    for access in ("full", "partial"):
        per = {m: dict(zip(r[access]["seeds"], r[access]["best"]["values"]))
               for m, r in table.items() if access in r}
        if per:
            specs[access] = paired_spec("test AUROC", per, [b for b in BASELINES if b in per],
                                        scale=100, plumbing=job.args.config in PLUMBING_CONFIGS)
    weights = {m: {str(r["seed"]): r["weight_relevance_auroc"]
                   for r in map(read_json, sorted((out / "runs").glob(f"{m}__shared__*.json")))
                   if "weight_relevance_auroc" in r} for m in table}
    ratio = out / "time_ratio.json"
    write_json(path, {
        "command": "python -m tasks " + shlex.join(job.argv),
        "stand_in": job.args.stand_in, "vary_data": job.args.vary_data,
        "tables": specs, "weight_relevance_auroc": {m: w for m, w in weights.items() if w},
        "settings": s.to_dict(), "time_ratio": read_json(ratio) if ratio.exists() else None,
        "environment": environment(),
    })


EXPERIMENTS = {"ppi": Experiment(
    task="ppi", name="ppi", description=__doc__.split("\n")[0], configs=CONFIGS,
    default_config="synthetic", run=run, summary=lambda m: (Path(m["out"]) / "results.md")
    .read_text().rstrip(), methods=METHODS, default_seeds="3",
    runs_glob=("runs/*.json", "ckpt/*", "time_ratio.json"),
    add_arguments=_arguments, prepare=_prepare, settings=_settings,
    default_out=lambda c: f"runs/ppi_{c}")}
