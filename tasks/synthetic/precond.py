"""Adam-preconditioned Neumann series for the IFT of an Adam-trained PT (experimental).

``MetaPretrainer``'s default IFT solve is ``neumann(alpha = pt_lr)``: J steps of *plain
gradient descent* on the PT loss's quadratic model. The PT itself runs Adam, whose step on
coordinate i is about ``lr / (sqrt(v_i) + eps)`` with v Adam's second-moment estimate, 10-1000x
larger than ``lr`` on low-gradient coordinates. So the default series describes how the PT
solution responds to phi over a horizon far shorter than the PT's own dynamics, and in the
rotation task that short-horizon response has the wrong sign far from 90 degrees (RESULTS.md).

Here the series uses Adam's per-coordinate step ``D = scale * lr / (sqrt(v_hat) + eps)`` read
from the PT optimizer's state at each solve:

    x = sum_{j < J} (I - D H)^j D b,

the J-step response of Adam-without-momentum to the phi-perturbation (with D = alpha I it is
``hg.neumann``). Not a library feature (yet): hypergrad/ is owned elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch

from hypergrad.solvers import SolveResult

__all__ = ["AdamPreconditionedNeumann"]


class AdamPreconditionedNeumann:
    """``solver(matvec, b)`` for ``MetaPretrainer``; call :meth:`bind` with the trainer first."""

    def __init__(self, iterations: int = 3, scale: float = 1.0, momentum: bool = False,
                 max_residual: float = 5.0) -> None:
        self.iterations, self.scale, self.momentum = int(iterations), float(scale), momentum
        self.max_residual = float(max_residual)
        self.trainer: Any = None

    def bind(self, trainer: Any) -> AdamPreconditionedNeumann:
        self.trainer = trainer
        return self

    def diagonal(self) -> dict[str, torch.Tensor]:
        opt = self.trainer.pt_opt
        group = opt.param_groups[0]
        lr, eps, (_, beta2) = group["lr"], group["eps"], group["betas"]
        out = {}
        for k, p in self.trainer.pt_params.items():
            st = opt.state.get(p, {})
            if "exp_avg_sq" not in st:  # no PT step yet: plain gradient descent at lr
                out[k] = torch.full_like(p, self.scale * lr)
                continue
            v_hat = st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))
            out[k] = self.scale * lr / (v_hat.sqrt() + eps)
        return out

    def __call__(self, matvec, b) -> SolveResult:
        if not isinstance(b, dict):
            raise TypeError("AdamPreconditionedNeumann expects dict-shaped PT parameters")
        if self.momentum:
            return self._heavy_ball(matvec, b)
        d = self.diagonal()
        t = {k: d[k] * v for k, v in b.items()}
        x = dict(t)
        b_norm = torch.sqrt(sum((v.double() ** 2).sum() for v in b.values()))
        residual = torch.ones((), dtype=torch.float64)
        for j in range(self.iterations):
            ht = matvec(t)
            t = {k: t[k] - d[k] * ht[k] for k in t}
            # b - H x_j = D^{-1} t_{j+1}: exact, from the same matvec
            r = torch.sqrt(sum(((t[k] / d[k]).double() ** 2).sum() for k in t))
            if not bool(torch.isfinite(r)):
                residual = torch.tensor(float("inf"), dtype=torch.float64)
                break
            residual = r / b_norm.clamp_min(1e-30)
            if j + 1 < self.iterations:
                x = {k: x[k] + t[k] for k in x}
        return SolveResult(x, torch.tensor(self.iterations), residual.to(b_norm.dtype),
                           residual <= 1e-6, {"precond": "adam"})

    def _heavy_ball(self, matvec, b) -> SolveResult:
        """J steps of linearised Adam *with* its momentum on 0.5 x^T H x - b^T x from x = 0:

            m <- beta1 m + (1 - beta1) (b - H x),   x <- x + D m.

        That is how the PT solution (Adam, second moments frozen) responds to the
        phi-perturbation over J PT steps; it is stable wherever the PT's own Adam is (heavy
        ball tolerates D H up to 2 (1 + beta1) / (1 - beta1), not 2), and x -> H^{-1} b.
        """
        d = self.diagonal()
        beta1 = self.trainer.pt_opt.param_groups[0]["betas"][0]
        x = {k: torch.zeros_like(v) for k, v in b.items()}
        m = {k: torch.zeros_like(v) for k, v in b.items()}
        r = dict(b)
        b_norm = torch.sqrt(sum((v.double() ** 2).sum() for v in b.values())).clamp_min(1e-30)
        best, best_res = x, torch.ones((), dtype=torch.float64)
        res = best_res
        for j in range(self.iterations + 1):
            if j > 0:
                hx = matvec(x)
                r = {k: b[k] - hx[k] for k in b}
                res = torch.sqrt(sum((v.double() ** 2).sum() for v in r.values())) / b_norm
                if not bool(torch.isfinite(res)):
                    break
                if res <= best_res:
                    best, best_res = x, res
            if j == self.iterations:
                break
            m = {k: beta1 * m[k] + (1 - beta1) * r[k] for k in m}
            x = {k: x[k] + d[k] * m[k] for k in x}
        if bool(torch.isfinite(res)) and res <= self.max_residual:
            best, best_res = x, res  # the J-step response itself
        # else the linearised dynamics grew (negative curvature far from a PT minimum): the
        # iterate with the smallest residual ||b - H x|| is returned (x = 0 if none beats it).
        return SolveResult(best, torch.tensor(self.iterations),
                           best_res.to(b_norm.dtype), best_res <= 1e-6, {"precond": "adam-hb"})
