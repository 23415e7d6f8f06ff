"""Warm-started IFT solves along online meta-pretraining (issue 17.3; AmIGO, Arbel & Mairal 2022).

    python studies/warm_start.py [--tasks rotation,noisy,ppi] [--meta-steps 60] [--seeds 0,1,2]
                                 [--metric-steps N] [--out studies/results/warm_start.json]

Part A runs on the first seed for ``--meta-steps`` meta steps; part B on every seed with the
task config's length (rotation/noisy: their ``smoke`` configs, PPI: ``synthetic``).

A. HVPs to reach the same relative residual. Along each task's own online run (its trainer,
   solver and batches, cold starts), every meta step's IFT system ``H x = b`` (the PT Hessian,
   ``b`` = dL_val/dtheta_PT) is also solved on the side, twice:
   * MINRES (the PT Hessian is indefinite online, so CG breaks down at once) to a relative
     residual ``tol`` (per task, :data:`TOL`: online PT Hessians are ill-conditioned, and these
     take a cold MINRES 10-40 HVPs; ``--tol`` overrides), from
     0 (cold) and from the previous meta step's side solution (warm, with the trainer's guard:
     a cold start when ``||b - b_prev|| >= ||b||``); HVPs counted, the warm start's included;
   * the task's Neumann series (step = PT lr): warm from the previous warm iterate with the
     task's HVP budget, then the number of cold HVPs needed to reach the residual warm reached.
B. The task metric with ``MetaPretrainer(warm_start=True)`` against cold starts, through the
   task's own entry point (the trainer's constructor is wrapped to switch warm starts on):
   rotation |phi - 90| (Algorithm 1's Neumann IFT, ``ift="neumann"``), noisy-label clean/noisy
   weight AUROC, PPI relevant-task weight AUROC.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hypergrad as hg  # noqa: E402
from hypergrad import tree  # noqa: E402


# ------------------------------------------------------------------- A: HVPs to a residual
def _norm(t) -> float:
    return float(torch.sqrt(tree.vdot(t, t)))


def _minres_to(matvec, b, x0, tol: float, maxiter: int) -> tuple[Any, int, float]:
    """MINRES to ``||b - H x|| <= tol ||b||`` from ``x0`` (by defect correction: MINRES on
    ``H d = b - H x0`` from 0, the same Krylov iterates as MINRES from ``x0``). Returns
    (x, HVPs including the one for ``H x0``, relative residual)."""
    bn = _norm(b)
    if x0 is None:
        r0, x0, spent = b, tree.zeros_like(b), 0
    else:
        r0, spent = tree.sub(b, matvec(x0)), 1
    rn = _norm(r0)
    if rn <= tol * bn:
        return x0, spent, rn / bn
    res = hg.minres(matvec, r0, tol=tol * bn / rn, maxiter=maxiter)
    x = tree.add(x0, res.solution)
    rel = _norm(tree.sub(b, matvec(x))) / bn  # the true residual (not counted: a check)
    return x, spent + int(res.iterations), rel


def _neumann_terms(matvec, r0, bn: float, alpha: float, target: float, cap: int):
    """Terms of ``alpha sum_j (I - alpha H)^j r0`` until its residual ``||(I - alpha H)^J r0||``
    is <= target * ||b||; returns (HVPs = J - 1 + 1 for the residual check is not counted,
    so J - 1, the sum, reached residual). ``cap`` bounds J."""
    p, acc = r0, r0
    for j in range(1, cap + 1):
        p = tree.axpy(-alpha, matvec(p), p)  # residual of the j-term sum
        if _norm(p) <= target * bn:
            return j - 1, acc, _norm(p) / bn  # j terms cost j - 1 HVPs (the last is a check)
        acc = tree.add(acc, p)
    return cap, acc, _norm(p) / bn


class SideSolves:
    """A solver wrapper: the trainer's own solve (returned), plus the side solves of part A."""

    def __init__(self, base, tol: float, alpha: float, budget: int, cap: int, maxiter: int):
        self.base, self.tol, self.alpha, self.budget, self.cap = base, tol, alpha, budget, cap
        self.maxiter = maxiter
        self.prev_b = None
        self.minres_x = None
        self.neu_x = None
        self.rows: list[dict[str, float]] = []

    def __call__(self, matvec, b, **kw):
        out = self.base(matvec, b, **kw)
        with torch.no_grad():
            row = self._measure(matvec, b)
        self.rows.append(row)
        return out

    def _measure(self, matvec, b) -> dict[str, float]:
        b = tree.detach(b)
        bn = _norm(b)
        keep = self.prev_b is not None and _norm(tree.sub(b, self.prev_b)) < bn
        self.prev_b = b
        row: dict[str, float] = {"b_moved": math.nan if not keep and self.minres_x is None
                                 else float(not keep)}
        _, cold, cold_res = _minres_to(matvec, b, None, self.tol, self.maxiter)
        x, warm, warm_res = _minres_to(matvec, b, self.minres_x if keep else None, self.tol,
                                       self.maxiter)
        self.minres_x = x
        row.update(minres_cold_hvps=cold, minres_warm_hvps=warm, minres_cold_res=cold_res,
                   minres_warm_res=warm_res)
        # Neumann: warm with the task's budget (1 HVP for the start + budget - 1 terms' HVPs)
        if keep and self.neu_x is not None:
            r0 = tree.sub(b, matvec(self.neu_x))
            x0, spent = self.neu_x, 1
        else:
            r0, x0, spent = b, tree.zeros_like(b), 0
        p, acc = r0, r0
        for _ in range(self.budget - 1):
            p = tree.axpy(-self.alpha, matvec(p), p)
            acc = tree.add(acc, p)
            spent += 1
        x = tree.axpy(self.alpha, acc, x0)
        self.neu_x = x
        reached = _norm(tree.sub(b, matvec(x))) / bn  # a check, not counted
        cold_n, _, cold_reached = _neumann_terms(matvec, b, bn, self.alpha, reached, self.cap)
        row.update(neumann_warm_hvps=spent, neumann_warm_res=reached,
                   neumann_cold_hvps_same_res=cold_n, neumann_cold_res=cold_reached,
                   neumann_cold_budget_res=_cold_budget_residual(matvec, b, bn, self.alpha,
                                                                 self.budget))
        return row


def _cold_budget_residual(matvec, b, bn, alpha, budget):
    p = b
    for _ in range(budget):
        p = tree.axpy(-alpha, matvec(p), p)
    return _norm(p) / bn


# -------------------------------------------------------------------------------- the tasks
def _rotation(seed: int, meta_steps: int | None):
    from tasks.synthetic import rotation as R

    cfg = dataclasses.replace(R.CONFIGS["smoke"], ift="neumann")
    if meta_steps:
        cfg = dataclasses.replace(cfg, meta_steps=meta_steps)
    init = cfg.init_angles[seed % len(cfg.init_angles)]

    def run(trainer_hook=None) -> dict[str, Any]:
        with _hooked(trainer_hook):
            res = R.run_one(cfg, seed, init)
        return {"metric": "|phi - 90| (deg)", "value": res["error"], "lower_is_better": True}

    return cfg, run


def _noisy(seed: int, meta_steps: int | None):
    from tasks.synthetic import noisy as N

    cfg = dataclasses.replace(N.CONFIGS["smoke"], baseline=False)
    if meta_steps:
        cfg = dataclasses.replace(cfg, meta_steps=meta_steps)

    def run(trainer_hook=None) -> dict[str, Any]:
        with _hooked(trainer_hook):
            res = N.run_one(cfg, seed)
        return {"metric": "clean/noisy weight AUROC", "value": res["auroc"],
                "lower_is_better": False}

    return cfg, run


def _ppi(seed: int, meta_steps: int | None):
    """The synthetic PPI validation (``python -m tasks ppi --synthetic --config synthetic``):
    Meta-PT through ``tasks.ppi.methods.pretrain``; metric: AUROC of the learned task weights
    against the PT tasks' true relevance (as the task's CLI reports it)."""
    from sklearn.metrics import roc_auc_score

    from tasks.ppi.config import get_config
    from tasks.ppi.data import load_ppi
    from tasks.ppi.finetune import make_problem
    from tasks.ppi.methods import pretrain
    from tasks.ppi.synthetic import read_meta, write_synthetic

    s = get_config("synthetic", meta_steps=meta_steps)
    root = write_synthetic(ROOT / "runs" / "ppi_synthetic_data", s.synthetic)  # ignored by git
    problem = make_problem(load_ppi(root), s, read_meta(root)["relevance"])
    def run(trainer_hook=None) -> dict[str, Any]:
        with _hooked(trainer_hook):
            res = pretrain("meta_pt", problem, s, seed, progress=False)
        return {"metric": "task-weight / relevance AUROC", "lower_is_better": False,
                "value": float(roc_auc_score(problem.relevance, res.weights))}

    return s, run


TASKS = {"rotation": _rotation, "noisy": _noisy, "ppi": _ppi}
TOL = {"rotation": 0.5, "noisy": 0.2, "ppi": 0.2}


@contextlib.contextmanager
def _hooked(hook):
    """Every MetaPretrainer built inside gets ``hook(trainer)`` applied after construction."""
    if hook is None:
        yield
        return
    init = hg.MetaPretrainer.__init__

    def patched(self, *a, **k):
        init(self, *a, **k)
        hook(self)

    hg.MetaPretrainer.__init__ = patched
    try:
        yield
    finally:
        hg.MetaPretrainer.__init__ = init


def part_a(name: str, seed: int, meta_steps: int, tol: float | None, budget: int | None
           ) -> dict:
    cfg, run = TASKS[name](seed, meta_steps)
    tol = TOL[name] if tol is None else tol
    found: dict[str, Any] = {}

    def install(tr):  # the task's own trainer, its solver wrapped by the side solves
        if not tr.meta:
            return
        kw = getattr(tr.solver, "keywords", {})
        found["alpha"] = float(kw.get("alpha", cfg.pt_lr))
        found["budget"] = budget or int(kw.get("iterations", 3))
        tr.solver = found["side"] = SideSolves(tr.solver, tol, found["alpha"], found["budget"],
                                               cap=2000, maxiter=200)

    t0 = time.time()
    run(install)  # the task's run, cold starts (its metric is part B's "cold")
    side = found["side"]
    alpha, budget, warmup = found["alpha"], found["budget"], getattr(cfg, "warmup", 0)
    rows = side.rows
    tot = {k: sum(r[k] for r in rows) for k in ("minres_cold_hvps", "minres_warm_hvps",
                                                  "neumann_cold_hvps_same_res",
                                                  "neumann_warm_hvps")}
    return {"task": name, "seed": seed, "meta_steps": meta_steps, "warmup": warmup, "tol": tol,
            "alpha": alpha, "budget_terms": budget, "rows": rows, "totals": tot,
            "minres_ratio": tot["minres_cold_hvps"] / max(1, tot["minres_warm_hvps"]),
            "neumann_ratio": tot["neumann_cold_hvps_same_res"] / max(1, tot["neumann_warm_hvps"]),
            "resets": sum(1 for r in rows if r["b_moved"] == 1.0), "seconds": time.time() - t0}


def part_b(name: str, seed: int, meta_steps: int | None) -> dict:
    _, run = TASKS[name](seed, meta_steps)

    built: list = []

    def warm(tr):
        tr.warm_start = True
        built.append(tr)

    out = {}
    for label, hook in (("cold", None), ("warm", warm)):
        t0 = time.time()
        out[label] = run(hook)
        out[label]["seconds"] = time.time() - t0
    flags = [m["warm_started"] for tr in built for m in tr.history if "warm_started" in m]
    out["warm"]["warm_started_fraction"] = sum(flags) / max(1, len(flags))
    out["warm"]["solver"] = repr(getattr(built[0].solver, "keywords", built[0].solver))
    return {"task": name, "seed": seed, **out}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="rotation,noisy,ppi")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--meta-steps", type=int, default=60, help="part A's run length")
    ap.add_argument("--metric-steps", type=int, default=None,
                    help="part B's run length (default: the task config's)")
    ap.add_argument("--tol", type=float, default=None, help="MINRES tolerance (default: TOL)")
    ap.add_argument("--budget", type=int, default=None, help="Neumann terms (default: task's)")
    ap.add_argument("--parts", default="a,b")
    ap.add_argument("--device", default="cpu", help="cpu only: the tasks build on the CPU")
    ap.add_argument("--out", type=Path, default=ROOT / "studies" / "results" / "warm_start.json")
    a = ap.parse_args(argv)
    if a.device not in ("cpu", "auto"):
        ap.error("the tasks' public entry points build on the CPU; use --device cpu")
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()},
                              "load_average": os.getloadavg()[0], "a": [], "b": []}
    from tqdm.auto import tqdm

    jobs = [(p, t, s) for p in a.parts.split(",") for t in a.tasks.split(",")
            for s in (seeds[:1] if p == "a" else seeds)]
    for part, name, seed in tqdm(jobs, desc="warm-start study"):
        if part == "a":
            r = part_a(name, seed, a.meta_steps, a.tol, a.budget)
            print(f"{name} seed {seed}: MINRES to {r['tol']:g}: {r['minres_ratio']:.2f}x fewer "
                  f"HVPs warm; Neumann: {r['neumann_ratio']:.2f}x; {r['resets']} resets",
                  flush=True)
        else:
            r = part_b(name, seed, a.metric_steps)
            print(f"{name} seed {seed}: {r['cold']['metric']} cold {r['cold']['value']:.4g}, "
                  f"warm {r['warm']['value']:.4g}", flush=True)
        result[part].append(r)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
