"""Appendix-E-style study: Algorithm 1's hypergradient vs exact differentiation of PT + FT.

The exact meta-objective at a finite horizon is

    g(phi) = L_val( FT_K( PT_T(theta_0; phi) ) ),

T plain-SGD PT steps from a fixed theta_0 (fixed batches, fixed augmentation noise), then K
head-only FT steps from a fixed (zero) FT head. Its exact gradient is reverse mode through all
T + K steps (``hg.unroll`` with nothing truncated: a full unroll of every step). Algorithm 1's
hypergradient at the same point replaces the T-step PT Jacobian d theta_T / d phi by the IFT at
theta_T (Neumann series with alpha = the PT step size, as MetaPretrainer does), keeping the same
exact K-step FT unroll, so the comparison isolates the IFT approximation.

Two meta-training runs from the same phi_0:
- exact: Adam on phi with the exact gradient of g (PT re-run from theta_0 at every meta step);
  along it, the cosine between Algorithm 1's hypergradient and the exact one at every step;
- Algorithm 1: the online ``hg.MetaPretrainer`` (SGD PT, P steps per meta step, theta_PT and
  psi_FT online), same number of meta steps and meta optimizer.
For the rotation (phi a scalar) the cosine is the sign agreement; the noisy-label weight net
(phi a vector) gives a real cosine. Finally, the dependence of the recovered angle on K and P
(Algorithm 1 on the main rotation setup).

    python -m studies.exactness [--config paper|smoke|tiny] [--part all|cosine|kp]
                                [--out runs/synthetic/exactness]

(until issue 15 this was ``python -m tasks synthetic exactness``; same files, same numbers).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hypergrad as hg
from tasks.common import mean_std, seed_everything, write_json
from tasks.harness import run_seeds
from tasks.synthetic import noisy as N
from tasks.synthetic import rotation as R

__all__ = ["ExactnessConfig", "CONFIGS", "exact_and_alg1", "compare_run", "kp_study", "run"]


@dataclass(frozen=True)
class ExactnessConfig:
    task: str = "rotation"        # or "noisy"
    T: int = 200                  # PT SGD steps inside the exact objective
    P: int = 10                   # PT steps per meta step of the online Algorithm-1 run
    K: int = 1
    pt_lr: float = 0.1            # SGD (the exact unroll differentiates plain SGD steps)
    ft_lr: float = 0.5
    meta_steps: int = 30
    meta_lr: float = 3.0          # Adam on phi (rotation: degrees; noisy: weight-net params)
    init_angle: float = 54.0      # rotation start (run() studies every angle in init_angles)
    init_angles: tuple = (54.0, 18.0)
    neumann_iterations: tuple = (3.0, 20.0)  # Algorithm 1 (first) and a longer series
    batch_size: int = 64
    width: int = 32
    seed: int = 0
    dtype: str = "float32"        # rotation only (float64 for the finite-difference test)
    # K / P study (Algorithm 1 on the main rotation setup, same PT budget)
    kp_K: tuple = (0.0, 1.0, 3.0, 10.0)
    kp_P: tuple = (1.0, 10.0, 50.0)
    kp_seeds: tuple = (2.0, 5.0, 8.0)   # init angles 36, 90, 144
    kp_pt_steps: int = 3000       # total PT steps of every K/P run (meta_steps = this / P)
    kp_cross: bool = True         # K sweep at P = 10 and P sweep at K = 1 (not the full grid)


CONFIGS = {
    "paper": ExactnessConfig(),
    "smoke": ExactnessConfig(T=60, P=10, meta_steps=8, kp_K=(0.0, 1.0), kp_P=(10.0,),
                             kp_seeds=(3.0,), kp_pt_steps=600),
    "tiny": ExactnessConfig(T=4, P=2, meta_steps=2, batch_size=16, width=8, kp_K=(1.0,),
                            kp_P=(2.0,), kp_seeds=(0.0,), kp_pt_steps=4),
}


def _task(cfg: ExactnessConfig):
    if cfg.task == "rotation":
        tcfg = dataclasses.replace(R.CONFIGS["paper"], width=cfg.width, batch_size=cfg.batch_size,
                                   pt_lr=cfg.pt_lr, ft_lr=cfg.ft_lr, K=cfg.K, P=cfg.P,
                                   dtype=cfg.dtype)
        task = R.RotationTask(tcfg, cfg.seed)
        h0 = {"phi": torch.tensor(cfg.init_angle, dtype=task.pt.x.dtype)}
    elif cfg.task == "noisy":
        tcfg = dataclasses.replace(N.CONFIGS["paper"], width=cfg.width, batch_size=cfg.batch_size,
                                   pt_lr=cfg.pt_lr, ft_lr=cfg.ft_lr, K=cfg.K, P=cfg.P)
        task = N.NoisyTask(tcfg, cfg.seed)
        h0 = task.hparams0
    else:
        raise ValueError(f"`task` must be 'rotation' or 'noisy', got {cfg.task!r}")
    return task, h0


def _zero_head(task) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in task.ft_head0.items()}


def exact_and_alg1(task, hparams, cfg: ExactnessConfig) -> dict[str, Any]:
    """Exact dg/dphi by a full unroll of T PT + K FT steps, and Algorithm 1's at theta_T."""
    h = {k: v.detach().clone().requires_grad_(True) for k, v in hparams.items()}

    def pt_step(p, hh, t):
        return hg.gradient_step(lambda pp, q: task.pt_loss(pp, q, task.pt_batch(t)), cfg.pt_lr)(
            p, hh, t)

    head0 = _zero_head(task)
    ft_step = hg.gradient_step(lambda hd, e: task.ft_loss(e, hd, "train"), cfg.ft_lr)
    with torch.enable_grad():
        theta = hg.unroll(pt_step, task.pt_params0, h, cfg.T)
        enc = theta if task.encoder is None else task.encoder(theta)
        head = hg.unroll(ft_step, head0, enc, cfg.K)
        val = task.ft_loss(enc, head, "val")
        exact = torch.autograd.grad(val, list(h.values()), allow_unused=True)
    exact = {k: torch.zeros_like(v) if g is None else g
             for (k, v), g in zip(h.items(), exact)}
    theta_T = {k: v.detach() for k, v in theta.items()}
    last = task.pt_batch(cfg.T - 1)
    alg1 = {}
    for J in cfg.neumann_iterations:
        res = hg.pretraining_hypergrad(
            lambda p, q: task.pt_loss(p, q, last),
            lambda e, hd: task.ft_loss(e, hd, "train"),
            lambda e, hd: task.ft_loss(e, hd, "val"),
            theta_T, head0, h, encoder=task.encoder, ft_steps=cfg.K, ft_lr=cfg.ft_lr,
            head_only=True,
            solver=functools.partial(hg.neumann, iterations=int(J), alpha=cfg.pt_lr),
        )
        alg1[int(J)] = res.hypergrad
    return {"exact": exact, "alg1": alg1, "val": float(val.detach())}


def _flat(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in t.values()])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def compare_run(cfg: ExactnessConfig, progress: bool = True) -> dict[str, Any]:
    """Exact meta-training with the cosine to Algorithm 1 at every step, then the online run."""
    seed_everything(cfg.seed)
    task, h0 = _task(cfg)
    h = {k: v.detach().clone().requires_grad_(True) for k, v in h0.items()}
    opt = torch.optim.Adam(list(h.values()), lr=cfg.meta_lr)
    cos: dict[int, list[float]] = {int(J): [] for J in cfg.neumann_iterations}
    exact_vals, alg1_vals, vals, phis = [], [], [], []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.meta_steps, desc=f"exact ({cfg.task})", leave=False)
    for _ in range(cfg.meta_steps):
        r = exact_and_alg1(task, h, cfg)
        e = _flat(r["exact"])
        for J, g in r["alg1"].items():
            cos[J].append(_cos(_flat(g), e))
        if e.numel() == 1:
            exact_vals.append(float(e))
            alg1_vals.append(float(_flat(r["alg1"][int(cfg.neumann_iterations[0])])))
        vals.append(r["val"])
        opt.zero_grad()
        for k, v in h.items():
            v.grad = r["exact"][k].detach().clone()
        opt.step()
        if "phi" in h:
            phis.append(float(h["phi"].detach()))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    exact_time = time.perf_counter() - t0

    # Algorithm 1, online (SGD PT so both runs use the same PT algorithm).
    seed_everything(cfg.seed)
    tr = hg.MetaPretrainer(
        pt_loss=task.pt_loss, ft_loss=task.ft_loss, pt_params=task.pt_params0,
        ft_head=_zero_head(task), hparams=h0, encoder=task.encoder,
        pt_optimizer=lambda ts: torch.optim.SGD(ts, lr=cfg.pt_lr),
        meta_optimizer=lambda ts: torch.optim.Adam(ts, lr=cfg.meta_lr),
        P=cfg.P, K=cfg.K, ft_lr=cfg.ft_lr, head_only=True,
        solver=functools.partial(hg.neumann, iterations=int(cfg.neumann_iterations[0]),
                                 alpha=cfg.pt_lr),
    )
    alg_phis: list[float] = []
    t1 = time.perf_counter()
    tr.run(cfg.meta_steps, task.pt_batch, task.ft_batch, progress=progress,
           callback=(lambda j, m: alg_phis.append(float(tr.hparams["phi"].detach())))
           if "phi" in h else None)
    alg_time = time.perf_counter() - t1
    out: dict[str, Any] = {
        "task": cfg.task, "cosine": {str(J): c for J, c in cos.items()},
        "cosine_mean": {str(J): float(np.mean(c)) for J, c in cos.items()},
        "exact_val_loss": vals, "exact_run_seconds": exact_time, "alg1_run_seconds": alg_time,
    }
    if exact_vals:
        a, b = np.asarray(alg1_vals), np.asarray(exact_vals)
        out.update(
            exact_hypergrad=exact_vals, alg1_hypergrad=alg1_vals,
            sign_agreement=float(np.mean(np.sign(a) == np.sign(b))),
            pearson=float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 else float("nan"),
            phi_exact=phis, phi_alg1=alg_phis, final_phi_exact=phis[-1],
            final_phi_alg1=alg_phis[-1], init_angle=cfg.init_angle,
        )
    else:
        stats_exact = N.weight_stats(task.all_weights(h), task.noisy.numpy())
        stats_alg1 = N.weight_stats(task.all_weights(tr.hparams), task.noisy.numpy())
        out.update(final_exact=stats_exact, final_alg1=stats_alg1)
    return out


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


def plot_exactness(cos: list[float], phi_alg: list[float], phi_exact: list[float], target: float,
                   path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(cos, marker=".", lw=1)
    a.set_ylim(-1.05, 1.05)
    a.set_xlabel("meta step")
    a.set_ylabel("cosine(Algorithm 1, exact)")
    b.plot(phi_alg, label="Algorithm 1")
    b.plot(phi_exact, label="exact (full unroll)")
    if target is not None:
        b.axhline(target, color="k", ls="--", lw=1)
    b.set_xlabel("meta step")
    b.set_ylabel("phi")
    b.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def run(cfg: ExactnessConfig, out: Path, part: str = "all", progress: bool = True
        ) -> dict[str, Any]:
    out = Path(out)
    metrics: dict[str, Any] = {"experiment": "exactness", "config": dataclasses.asdict(cfg)}
    if part in ("all", "cosine"):
        runs = [(f"rotation_init{a:g}", dataclasses.replace(cfg, task="rotation", init_angle=a))
                for a in cfg.init_angles]
        runs.append(("noisy", dataclasses.replace(cfg, task="noisy", meta_lr=2e-2)))
        for name, c in runs:
            f = out / f"compare_{name}.json"
            if not f.exists():
                write_json(f, compare_run(c, progress=progress))
            metrics[f"compare_{name}"] = json.loads(f.read_text())
        J = str(int(cfg.neumann_iterations[0]))
        for name, _ in runs[:-1]:
            rot = metrics[f"compare_{name}"]
            plot_exactness(rot["cosine"][J], rot["phi_alg1"], rot["phi_exact"],
                           R.CONFIGS["paper"].ft_angle, out / f"exactness_{name}.png")
    if part in ("all", "kp"):
        metrics.update(kp_study(cfg, out / "kp", progress=progress))
    for f in sorted(out.glob("compare_*.json")):  # parts finished by earlier invocations
        metrics.setdefault(f.stem, json.loads(f.read_text()))
    old = out / "metrics.json"
    if "kp_table" not in metrics and old.exists():
        prev = json.loads(old.read_text())
        if "kp_table" in prev:
            metrics["kp_table"] = prev["kp_table"]
    write_json(out / "metrics.json", metrics)
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    lines = []
    for name in sorted(k[len("compare_"):] for k in metrics if k.startswith("compare_")):
        c = metrics[f"compare_{name}"]
        cm = ", ".join(f"Neumann J={J}: {v:.3f}" for J, v in c["cosine_mean"].items())
        lines.append(f"{name}: mean cosine(Algorithm 1, exact) over meta steps: {cm}")
        if "final_phi_exact" in c:
            lines.append(f"  sign agreement {c['sign_agreement']:.2f}; final phi: exact "
                         f"{c['final_phi_exact']:.2f}, Algorithm 1 {c['final_phi_alg1']:.2f} "
                         f"(from {c['init_angle']:.0f})")
        else:
            lines.append(f"  clean/noisy ratio: exact {c['final_exact']['ratio']:.3g}, "
                         f"Algorithm 1 {c['final_alg1']['ratio']:.3g}")
    for row in metrics.get("kp_table", []):
        lines.append(f"K={row['K']:2d} P={row['P']:2d}: |phi-90| = {row['error_mean']:.2f} +- "
                     f"{row['error_std']:.2f} (median {row['error_median']:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m studies.exactness", description=__doc__)
    p.add_argument("--config", default="paper", choices=sorted(CONFIGS))
    p.add_argument("--part", default="all", choices=["all", "cosine", "kp"])
    p.add_argument("--seed", type=int, default=None, help="data / init seed (default: config's)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/synthetic/exactness[_CONFIG])")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = CONFIGS[args.config]
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    suffix = "" if args.config == "paper" else f"_{args.config}"
    out = args.out or Path("runs/synthetic") / f"exactness{suffix}"
    print(summary(run(cfg, out, part=args.part, progress=not args.no_progress)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
