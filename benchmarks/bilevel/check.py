"""Checks that precede the timings, in float64.

* ``agreement``: the hypergradient at ``h`` by the dense reference (metrics.hypergradient),
  hypergrad (implicit_grad + CG to 1e-13), torchopt (custom_root + solve_cg to 1e-13) and
  higher (an unroll of ``T`` SGD steps started at theta*, i.e. the Neumann series of the IFT
  truncated after ``T`` terms, ``T`` set so that ``(1 - mu / L)^T <= 1e-12``, capped).
* ``warm_start_study``: along one outer trajectory, at every step the same (theta*, h) gets
  a warm CG solve of ``J_warm`` steps (x0 = the previous solution) and the cheapest cold
  solve (x0 = 0) that is at least as accurate: HVPs per step at equal hypergradient error.
* ``cleaning_references``: test errors of the linear model trained (exactly, Newton) on the
  clean labels, and with oracle weights (1 on clean samples, 0 on corrupted ones).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

import hypergrad as hg

from . import metrics as M
from .peers import higher_unroll, torchopt_hypergradient, torchopt_solve
from .problems import Problem, datacleaning


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _curvature(P: Problem, theta: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    H = P.tensors["in_Hzz"] if P.kind == "quadratic" else M.dense_hessian(P, theta, h)
    e = torch.linalg.eigvalsh(H)
    return float(e.min()), float(e.max())


def agreement(P: Problem, h: torch.Tensor | None = None, max_unroll: int = 5000) -> dict:
    """Relative differences of each library's hypergradient to the dense float64 one."""
    assert P.theta0.dtype == torch.float64, "the agreement check runs in float64"
    h = P.h0 if h is None else h
    theta, ref = M.hypergradient(P, h)
    n = theta.numel()
    g_hg = hg.implicit_grad(
        P.bind(P.inner),
        P.bind(P.outer),
        theta,
        h,
        solver=functools.partial(hg.cg, maxiter=10 * n, tol=1e-13),
        on_failure="raise",
    )
    g_to = torchopt_hypergradient(P, theta, h, torchopt_solve("cg", 10 * n, tol=1e-13))
    mu, L = _curvature(P, theta, h)
    T = min(max_unroll, math.ceil(math.log(1e-12) / math.log1p(-mu / L)))
    g_hi, _ = higher_unroll(P, theta, h, T, 1.0 / L)
    return {
        "hypergrad": _rel(g_hg, ref),
        "torchopt": _rel(g_to, ref),
        "higher": _rel(g_hi, ref),
        "higher_steps": T,
        "higher_truncation_bound": (1 - mu / L) ** T,
        "ref_norm": float(ref.norm()),
    }


def warm_start_study(P: Problem, steps: int = 60, J_warm: int = 2, J_max: int = 100) -> dict:
    """HVPs per outer step, warm vs cold CG, at equal hypergradient error (float64).

    Along the outer trajectory driven by the warm method, theta is the exact theta*(h) (so
    the linear solve is the only error). Warm: ``J_warm`` CG steps from the previous
    solution (plus the one matvec of the start residual). Cold: the fewest CG steps from
    zero whose hypergradient error is no larger than the warm one (capped at ``J_max``:
    a capped step is counted as ``J_max``, which favours cold)."""
    assert P.theta0.dtype == torch.float64, "the warm-start study runs in float64"
    h, v, theta = P.h0.clone(), None, None
    rows = []

    def solve(J: int, x0):
        solver = functools.partial(hg.cg, maxiter=J, tol=0.0, x0=x0)
        return hg.implicit_grad(
            P.bind(P.inner),
            P.bind(P.outer),
            theta,
            h,
            solver=solver,
            return_info=True,
            stationarity_tol=None,
            on_failure="ignore",
        )

    for _ in range(steps):
        theta, exact = M.hypergradient(P, h, theta)
        g_w, info = solve(J_warm, v)
        v = info["solve"].solution.detach()
        err_w = _rel(g_w, exact)
        J_c, err_c = J_max, float("inf")
        start = max(1, rows[-1]["hvps_cold"] - 3) if rows else 1  # cold J grows slowly
        if start > 1 and _rel(solve(start, None)[0], exact) <= err_w:
            start = 1  # it fell: scan from the bottom
        for J in range(start, J_max + 1):
            err_c = _rel(solve(J, None)[0], exact)
            if err_c <= err_w:
                J_c = J
                break
        rows.append(
            {
                "hvps_warm": int(info["solve"].iterations),
                "hvps_cold": J_c,
                "err_warm": err_w,
                "err_cold": err_c,
                "capped": err_c > err_w,
            }
        )
        h = (h - P.outer_lr * g_w).detach()
    hc = np.array([r["hvps_cold"] for r in rows], dtype=float)
    hw = np.array([r["hvps_warm"] for r in rows], dtype=float)
    return {
        "steps": steps,
        "J_warm": J_warm,
        "J_max": J_max,
        "hvps_per_step_cold": float(hc.mean()),
        "hvps_per_step_warm": float(hw.mean()),
        "ratio": float(hc.sum() / hw.sum()),
        "capped_steps": int(sum(r["capped"] for r in rows)),
        "median_err_warm": float(np.median([r["err_warm"] for r in rows])),
        "median_err_cold": float(np.median([r["err_cold"] for r in rows])),
        "rows": rows,
    }


def cleaning_references(P64: Problem) -> dict:
    """Test errors of the linear model (same reg) on clean labels / with oracle weights."""
    t = P64.tensors
    splits = {k: v.cpu().numpy() for k, v in t.items()}
    splits["y_train"] = splits["y_train_clean"]
    clean = datacleaning(
        splits, "clean", "", reg=P64.info["reg"], dtype=torch.float64, device=str(P64.theta0.device)
    )
    ones = torch.full_like(P64.h0, 40.0)  # sigmoid(40) = 1 in float64
    th_clean = M.solve_inner(clean, ones)
    oracle = torch.where(t["corrupted_mask"].bool(), -40.0, 40.0).to(P64.h0)
    th_oracle = M.solve_inner(P64, oracle)
    th_noisy = M.solve_inner(P64, ones)
    return {
        "clean_labels": M.classification_error(clean, th_clean),
        "oracle_weights": M.classification_error(P64, th_oracle),
        "noisy_unit_weights": M.classification_error(P64, th_noisy),
        "corrupted_fraction": float(t["corrupted_mask"].double().mean()),
    }
