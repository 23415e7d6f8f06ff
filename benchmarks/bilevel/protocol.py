"""The protocol: every method on every problem for ``seeds`` runs of ``budget`` seconds.

A run times only the method's steps (wall: ``time.perf_counter``, with a device
synchronisation on GPUs; ``cpu_time``: ``time.process_time``, which a shared machine's load
disturbs less); the metrics (metrics.Evaluator, float64, exact) are taken at log-spaced times and
are not counted, as in BenchOpt. Runs of one problem are interleaved seed by seed (all
methods for seed 0, then seed 1, ...) so that load changes on a shared machine hit every
method alike. Curves are summarised on a common grid by the median and quartiles over seeds;
time-to-threshold is the first recorded time where ``value = ||grad h||^2 <= threshold``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from .methods import Method
from .metrics import Evaluator, median_quartiles
from .problems import Problem


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(
    P: Problem, P64: Problem, method: Method, seed: int, budget: float, n_evals: int = 25
) -> dict:
    """One run: ``method`` on ``P`` for ``budget`` seconds of compute; returns its records."""
    torch.manual_seed(seed)
    ev = Evaluator(P64)
    s = method.init(P, seed)
    dev = s.theta.device
    checkpoints = list(budget * np.logspace(-2.5, 0, n_evals))
    records = [{"time": 0.0, "cpu_time": 0.0, **s.counts(), **ev(s.theta, s.h)}]
    elapsed, cpu, diverged = 0.0, 0.0, ""
    while elapsed < budget and checkpoints:
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            method.step(P, s)
        except (ValueError, FloatingPointError, ZeroDivisionError) as err:  # NaN/inf, breakdown
            diverged = f"{type(err).__name__}: {str(err)[:200]}"
            break
        _sync(dev)
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        if elapsed >= checkpoints[0]:
            while checkpoints and elapsed >= checkpoints[0]:
                checkpoints.pop(0)
            if not bool(torch.isfinite(s.h).all() and torch.isfinite(s.theta).all()):
                diverged = "non-finite iterate"
                break
            try:
                metrics = ev(s.theta, s.h)
            except (RuntimeError, ValueError) as err:  # the reference itself failed: say so
                diverged = f"evaluation failed: {type(err).__name__}: {str(err)[:200]}"
                break
            records.append({"time": elapsed, "cpu_time": cpu, **s.counts(), **metrics})
    return {
        "method": method.name,
        "library": method.library,
        "seed": seed,
        "stochastic": method.stochastic,
        "config": method.describe(),
        "records": records,
        "diverged": diverged,
    }


def run_problem(
    P: Problem,
    P64: Problem,
    methods: list[Method],
    seeds: int,
    budget: float,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    runs = []
    for seed in range(seeds):
        for m in methods:
            if progress:
                progress(f"{P.name} {m.name} seed {seed}")
            runs.append(run_one(P, P64, m, seed, budget))
    return runs


# ---------------------------------------------------------------------------- summaries


def step_curve(records: list[dict], x: str, y: str, grid: np.ndarray) -> np.ndarray:
    """The last recorded ``y`` at or before each grid point of ``x`` (NaN before the first)."""
    xs = np.array([r[x] for r in records], dtype=float)
    ys = np.array([r.get(y, np.nan) for r in records], dtype=float)
    pos = np.searchsorted(xs, grid, side="right") - 1
    out = np.where(pos >= 0, ys[np.clip(pos, 0, None)], np.nan)
    return out


def summarise(runs: list[dict], x: str, y: str, n_grid: int = 60) -> dict[str, dict]:
    """Per method: grid, median, lower and upper quartile of ``y`` against ``x``."""
    out: dict[str, dict] = {}
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    for name, rs in by_method.items():
        xmax = max(r["records"][-1][x] for r in rs)
        xmin = min((rec[x] for r in rs for rec in r["records"] if rec[x] > 0), default=xmax)
        if not xmax > 0:
            continue
        grid = np.logspace(np.log10(xmin), np.log10(xmax), n_grid)
        vals = np.stack([step_curve(r["records"], x, y, grid) for r in rs])
        med, lo, hi = median_quartiles(vals)
        out[name] = {
            "x": grid.tolist(),
            "median": med.tolist(),
            "q25": lo.tolist(),
            "q75": hi.tolist(),
            "library": rs[0]["library"],
        }
    return out


def time_to_threshold(runs: list[dict], threshold: float, x: str = "time") -> dict[str, dict]:
    """Per method: the median (over seeds) first ``x`` with ``value <= threshold``; inf for a
    seed that never got there, so the median is inf when half the seeds did not."""
    by: dict[str, list[float]] = {}
    for r in runs:
        hit = [rec[x] for rec in r["records"] if rec["value"] <= threshold]
        by.setdefault(r["method"], []).append(hit[0] if hit else float("inf"))
    return {
        m: {
            "median": float(np.median(v)),
            "q25": float(np.percentile(v, 25, method="lower")),  # no inf - inf
            "q75": float(np.percentile(v, 75, method="higher")),
            "reached": int(np.isfinite(v).sum()),
            "seeds": len(v),
        }
        for m, v in by.items()
    }


def final(runs: list[dict], key: str) -> dict[str, float]:
    """Per method: the median over seeds of ``key`` at the last record."""
    by: dict[str, list[float]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r["records"][-1].get(key, np.nan))
    return {
        m: float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan") for m, v in by.items()
    }
