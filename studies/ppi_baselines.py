"""PPI stand-ins with the trivial and oracle weightings, paired over seeds (issue 20).

    python -m studies.ppi_baselines --stand-in labels --seeds 0-2 \\
        --methods no_pt,graph_sup_pt,corr_pt,oracle_pt,meta_pt --out runs/ppi_baselines/labels
    python -m studies.ppi_baselines --stand-in structure --vary-data --seeds 100-102 \\
        --methods graph_sup_pt,oracle_pt --out runs/ppi_baselines/structure_tuning

Full access only. ``--vary-data``: seed k also generates the stand-in with generator seed k
(otherwise the config's generator seed, as RESULTS.md's runs). Each (method, seed) writes
``OUT/runs/<method>__shared__s<seed>.json`` in the CLI's record format and is skipped when it
exists; ``OUT/paired.json`` and ``OUT/paired.md`` are rebuilt from every finished run: test
AUROC x 100 (hard half, FT mode chosen on validation), mean +- std, and the paired difference
against the strongest of the non-meta baselines with a 95% t-interval and n.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from tasks.common import seed_everything, write_json
from tasks.paired import compare_to_strongest, format_paired, paired_header
from tasks.ppi.config import get_config
from tasks.ppi.data import load_ppi
from tasks.ppi.finetune import finetune, macro, make_problem
from tasks.ppi.fixed_weights import FIXED_METHODS
from tasks.ppi.methods import PT_METHODS, pretrain
from tasks.ppi.synthetic import read_meta, write_synthetic
from tasks.ppi.synthetic_latent import LatentConfig, write_latent
from tasks.results_table import markdown_table

METHODS = (*PT_METHODS, *FIXED_METHODS)
BASELINES = ("no_pt", "graph_sup_pt", "cotrain", "cotrain_pcgrad", "corr_pt")
MODES = ("full", "linear")


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def _problem(stand_in: str, config: str, data_seed: int | None, out: Path):
    s = get_config(config)
    syn = s.synthetic if data_seed is None else replace(s.synthetic, seed=data_seed)
    tag = f"data_s{syn.seed}"
    if stand_in == "structure":
        kw = {k: getattr(syn, k) for k in syn.__dataclass_fields__}
        root = write_latent(out / tag, LatentConfig(**kw))
    else:
        root = write_synthetic(out / tag, syn)
    problem = make_problem(load_ppi(root), s, read_meta(root)["relevance"])
    return problem, s.for_data(problem.split.pretrain.numel())


def run_one(method: str, problem, s, seed: int) -> dict[str, Any]:
    seed_everything(seed)
    t0 = time.perf_counter()
    res = pretrain(method, problem, s, seed, None, None, progress=False)
    pt_time = time.perf_counter() - t0
    ft = {mode: finetune(res.encoder, problem, s, mode, seed) for mode in MODES}
    rec: dict[str, Any] = {
        "method": method,
        "fold": None,
        "seed": seed,
        "ft": ft,
        "pt_info": res.info,
        "pt_wall_time": pt_time,
        "weights": res.weights,
        "heldout_tasks": None,
    }
    if res.weights is not None:
        rec["weight_relevance_auroc"] = float(roc_auc_score(problem.relevance, res.weights))
    return rec


def best_auroc(rec: dict[str, Any], split: str = "test_hard") -> float:
    """Test AUROC of the FT mode with the higher validation AUROC."""
    val = {m: macro(rec["ft"][m]["valid"]) for m in MODES}
    return macro(rec["ft"][max(MODES, key=lambda m: val[m])][split])


def summarise(out: Path) -> dict[str, Any]:
    recs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    per: dict[str, dict[int, float]] = {}
    wauc: dict[str, dict[int, float]] = {}
    for r in recs:
        per.setdefault(r["method"], {})[r["seed"]] = best_auroc(r)
        if "weight_relevance_auroc" in r:
            wauc.setdefault(r["method"], {})[r["seed"]] = r["weight_relevance_auroc"]
    per = {m: per[m] for m in METHODS if m in per}
    summary: dict[str, Any] = {"per_seed": per, "weight_relevance_auroc": wauc}
    bases = [b for b in BASELINES if b in per]
    if bases:
        common = set.intersection(*(set(v) for v in per.values()))
        both = {m: {k: v[k] for k in sorted(common)} for m, v in per.items()}
        diffs = compare_to_strongest(both, bases)
        summary["paired"] = {
            m: {
                "baseline": d.baseline,
                "mean": d.mean,
                "lo": d.lo,
                "hi": d.hi,
                "n": d.n,
                "seeds": list(d.seeds),
            }
            for m, d in diffs.items()
        }
        base = next(iter(diffs.values())).baseline if diffs else bases[0]
        rows = []
        for m, v in per.items():
            vals = np.array([v[k] for k in sorted(v)])
            std = f"{100 * vals.std(ddof=1):.1f}" if len(vals) > 1 else "n/a"
            cell = "(baseline)" if m == base else format_paired(diffs[m], scale=100)
            w = wauc.get(m)
            wcell = f"{np.mean(list(w.values())):.3f}" if w else "-"
            rows.append([m, f"{100 * vals.mean():.1f} +- {std}", cell, wcell])
        summary["markdown"] = markdown_table(
            [
                "method",
                "test AUROC x100 (mean +- std)",
                paired_header(base),
                "weight-relevance AUROC",
            ],
            rows,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stand-in", choices=("labels", "structure"), default="labels")
    p.add_argument("--seeds", default="0-2", help="e.g. 0-9 or 100,101")
    p.add_argument("--methods", default="no_pt,graph_sup_pt,corr_pt,oracle_pt,meta_pt")
    p.add_argument("--vary-data", action="store_true", help="generator seed = run seed")
    p.add_argument("--config", default="synthetic")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {METHODS}")
    torch.set_num_threads(1)
    out = Path(a.out)
    from tqdm.auto import tqdm

    for seed in tqdm(_seeds(a.seeds), desc="seeds"):
        problem, s = _problem(a.stand_in, a.config, seed if a.vary_data else None, out)
        for m in methods:
            path = out / "runs" / f"{m}__shared__s{seed}.json"
            if not path.exists():
                write_json(path, run_one(m, problem, s, seed))
        summary = summarise(out)
        write_json(out / "paired.json", summary)
        (out / "paired.md").write_text(summary.get("markdown", "") + "\n")
    print((out / "paired.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
