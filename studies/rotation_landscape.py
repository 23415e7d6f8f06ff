"""Fixed-angle hypergradient screen for the rotation experiment (RESULTS.md, "diagnosis").

For each fixed angle a, PT runs from scratch at phi = a (``pt_steps`` steps, no meta step);
then Algorithm 1's hypergradient dg/dphi is averaged over ``n_batches`` PT batches at that PT
solution, next to the FT-val loss there (one point of the from-scratch landscape). A setting
passes the screen when the mean hypergradient is negative (gradient descent moves phi up,
toward 90) at every angle in 18..60 degrees.

    python -m studies.rotation_landscape --set ift=neumann --angles 0,18,30,45,60
    python -m studies.rotation_landscape --warm 18 --more 500 --deltas=-12,-6,0,6,12
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch

import hypergrad as hg
from tasks.harness import apply_overrides
from tasks.synthetic.rotation import CONFIGS, build

__all__ = ["screen"]


def screen(cfg, angles=(0.0, 18.0, 30.0, 45.0, 60.0), seed: int = 1, pt_steps: int = 1500,
           n_batches: int = 8, ft_fit_steps: int = 0) -> list[dict]:
    """Mean and t-statistic of the hypergradient at PT solutions trained at fixed angles."""
    if cfg.ift == "forward":
        raise ValueError("the screen measures Algorithm 1's IFT hypergradient; the forward-mode "
                         "tangent has no fixed-point form: pass --set ift=neumann (or another "
                         "IFT variant)")
    task = build(cfg, seed)
    rows = []
    for a in angles:
        torch.manual_seed(seed)
        tr = task.trainer(a, meta=False)
        for i in range(pt_steps):
            tr.pt_step(task.pt_batch(i))
        head = {k: v.detach().clone() for k, v in tr.ft_head.items()}
        enc = tr.encoder(tr.pt_params) if tr.encoder is not None else tr.pt_params
        for _ in range(ft_fit_steps):  # optional: settle psi_FT first, as online training does
            hd = {k: v.clone().requires_grad_() for k, v in head.items()}
            with torch.enable_grad():
                gr = torch.autograd.grad(task.ft_loss(hg.tree.detach(enc), hd, "train"),
                                         list(hd.values()))
            head = {k: (v - cfg.ft_lr * g).detach() for (k, v), g in zip(hd.items(), gr)}
        hgs, vals, resid = [], [], []
        for b in range(n_batches):
            batch = task.pt_batch(10**6 + b)
            res = hg.pretraining_hypergrad(
                lambda p, h, batch=batch: task.pt_loss(p, h, batch),
                lambda e, hd: task.ft_loss(e, hd, "train"),
                lambda e, hd: task.ft_loss(e, hd, "val"),
                tr.pt_params, head, tr.hparams, encoder=tr.encoder, ft_steps=cfg.K,
                ft_lr=cfg.ft_lr, head_only=cfg.head_only, solver=tr.ift_solver())
            hgs.append(float(res.hypergrad["phi"]))
            solve = res.info.get("solve")
            resid.append(float(solve.residual_norm) if solve is not None else float("nan"))
            vals.append(float(res.val_loss))
        t = torch.tensor(hgs, dtype=torch.float64)
        sd = float(t.std()) if len(hgs) > 1 else float("nan")
        rows.append({"angle": a, "hypergrad_mean": float(t.mean()),
                     "t": float(t.mean()) / (sd / math.sqrt(len(hgs))) if sd > 0 else float("nan"),
                     "val_loss": sum(vals) / len(vals), "max_residual": max(resid),
                     "per_batch": [round(v, 6) for v in hgs],
                     "toward_90": bool(t.mean() < 0) if a < 90 else bool(t.mean() > 0)})
    return rows


def warm_landscape(cfg, base: float = 18.0, deltas=(0.0, 6.0, 12.0), seed: int = 1,
                   pt_steps: int = 1500, more_steps: int = 500) -> list[dict]:
    """FT-val loss after PT at ``base`` then ``more_steps`` more PT steps at ``base + delta``.

    The finite-difference version of what the IFT measures (the PT solution followed
    continuously in phi), next to the from-scratch landscape that ``screen`` reports.
    """
    task = build(cfg, seed)
    torch.manual_seed(seed)
    tr = task.trainer(base, meta=False)
    for i in range(pt_steps):
        tr.pt_step(task.pt_batch(i))
    state = copy.deepcopy(tr.state_dict())
    rows = []
    for d in deltas:
        tr.load_state_dict(copy.deepcopy(state))
        with torch.no_grad():
            tr.hparams["phi"].fill_(base + d)
        for i in range(pt_steps, pt_steps + more_steps):
            tr.pt_step(task.pt_batch(i))
        with torch.no_grad():
            v = float(task.ft_loss(tr.pt_params, tr.ft_head, "val"))
        rows.append({"base": base, "delta": d, "val_loss": v})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="paper")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--angles", default="0,18,30,45,60")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pt-steps", type=int, default=1500)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--ft-fit", type=int, default=0)
    ap.add_argument("--warm", default="", help="base angles of warm_landscape instead")
    ap.add_argument("--more", type=int, default=500, help="warm_landscape: PT steps at base+d")
    ap.add_argument("--deltas", default="0,6,12")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = apply_overrides(CONFIGS[a.config], a.set)
    if a.warm:
        for b in a.warm.split(","):
            for r in warm_landscape(cfg, float(b), tuple(float(d) for d in a.deltas.split(",")),
                                    seed=a.seed, pt_steps=a.pt_steps, more_steps=a.more):
                print(json.dumps(r), flush=True)
        return
    rows = screen(cfg, tuple(float(x) for x in a.angles.split(",")), a.seed, a.pt_steps,
                  a.batches, a.ft_fit)
    for r in rows:
        print(json.dumps(r), flush=True)
    ok = all(r["toward_90"] for r in rows if 18 <= r["angle"] <= 60)
    print(f"screen {'PASSED' if ok else 'FAILED'}: {a.set}", flush=True)


if __name__ == "__main__":
    main()
