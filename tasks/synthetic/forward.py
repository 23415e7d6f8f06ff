"""Forward-mode (tangent) hypergradient for a scalar phi (experimental; RESULTS.md).

Algorithm 1 takes d theta_PT / d phi from the IFT at the current PT parameters, through a
short Neumann series. In the rotation task that local response has the wrong sign far from 90
degrees: we measured that shifting phi by +3 degrees at a PT solution trained at 18 degrees
*raises* the 90-degree validation loss after 10 more PT steps and lowers it after 60 or 500
(a short-horizon bias; Wu et al. 2018). The IFT series only sees the short horizon.

Here the derivative of the actual PT trajectory is carried forward instead (forward-mode /
real-time recurrent hypergradient, Franceschi et al. 2017): a tangent ``T = d theta / d phi``
is updated at every PT step by differentiating the Adam step (m, v: Adam's moments),

    dg = H T + d(grad_theta L_PT)/d phi          (one double-backward per PT step)
    dm <- beta1 dm + (1 - beta1) dg,   dv <- beta2 dv + (1 - beta2) 2 g dg
    T  <- decay * T - d[lr_t m / (sqrt(v / c2) + eps)]     (lr_t = lr / c1; c1, c2: bias
                                                            corrections)

and the hypergradient is ``<dL_val/dtheta, T>`` with the
same K-step head-only FT unroll as Algorithm 1. It is the derivative, along the PT run, of the
validation loss with respect to a constant shift of phi over the whole run (``decay`` < 1 lets
old steps fade). phi must be a scalar (one tangent); cost: one extra Hessian-vector product per
PT step.
"""

from __future__ import annotations

from typing import Any

import torch

import hypergrad as hg
from hypergrad import tree

__all__ = ["ForwardModeTrainer"]


class ForwardModeTrainer(hg.MetaPretrainer):
    """``MetaPretrainer`` whose hypergradient is the forward-mode tangent (Adam PT only, no
    weight decay / amsgrad). The tangent runs only while ``meta`` is set (not in warm-up)."""

    def __init__(self, *args: Any, tangent_decay: float = 1.0, pt_split: Any = None,
                 **kwargs: Any) -> None:
        """``pt_split = (inputs, loss_x)`` (optional, faster): phi acts only through the PT
        inputs, ``inputs(hparams, batch) -> (x, dx/dphi)`` and
        ``pt_loss(p, h, batch) == loss_x(p, x, batch)``; then the mixed term is
        ``d(grad_theta L)/dx . dx/dphi`` and ``inputs`` need not be differentiated twice."""
        super().__init__(*args, **kwargs)
        self.pt_split = pt_split
        if len(self.hparams) != 1 or next(iter(self.hparams.values())).numel() != 1:
            raise ValueError("ForwardModeTrainer needs a single scalar meta-parameter")
        opt = self.pt_opt
        if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
            raise TypeError("ForwardModeTrainer linearises plain Adam: use one torch.optim.Adam "
                            f"param group as the PT optimizer, got {type(opt).__name__}")
        g = opt.param_groups[0]
        unsupported = {k: g.get(k) for k in ("weight_decay", "amsgrad", "maximize",
                                              "decoupled_weight_decay") if g.get(k)}
        if unsupported:  # their terms are not in the tangent recursion: it would be wrong
            raise ValueError(f"ForwardModeTrainer does not differentiate Adam's {unsupported}; "
                             "put weight decay in the PT loss instead")
        self.tangent_decay = float(tangent_decay)
        self.tangent = {k: torch.zeros_like(v) for k, v in self.pt_params.items()}
        self.tangent_m = {k: torch.zeros_like(v) for k, v in self.pt_params.items()}
        self.tangent_v = {k: torch.zeros_like(v) for k, v in self.pt_params.items()}

    def pt_step(self, batch: Any) -> float:
        if not self.meta:
            return super().pt_step(batch)
        keys = list(self.pt_params)
        params = [self.pt_params[k] for k in keys]
        (hk, h0), = self.hparams.items()
        if self.pt_split is not None:
            inputs, loss_x = self.pt_split
            x, xdot = inputs(tree.detach(self.hparams), batch)
            leaf = x.detach().requires_grad_(True)
        else:
            leaf, xdot = h0.detach().clone().requires_grad_(True), None
        with torch.enable_grad():
            if xdot is None:
                loss = self.pt_loss(self.pt_params, {hk: leaf}, batch)
            else:
                loss = loss_x(self.pt_params, leaf, batch)
            grads = torch.autograd.grad(loss, params + [leaf], create_graph=True)
            g, g_in = grads[:-1], grads[-1]
            mixed = g_in.sum() if xdot is None else (g_in * xdot).sum()
            s = sum((gi * self.tangent[k]).sum() for gi, k in zip(g, keys)) + mixed
            dg = torch.autograd.grad(s, params, allow_unused=True)
        self.pt_opt.zero_grad(set_to_none=True)
        for p, gi in zip(params, g):
            p.grad = gi.detach()
        self.pt_opt.step()
        self.pt_steps_done += 1
        group = self.pt_opt.param_groups[0]
        lr, eps, (beta1, beta2) = group["lr"], group["eps"], group["betas"]
        with torch.no_grad():
            for k, p, gi, d in zip(keys, params, g, dg):
                d = torch.zeros_like(p) if d is None else d
                st = self.pt_opt.state[p]
                t = float(st["step"])
                c1, c2 = 1 - beta1**t, 1 - beta2**t
                dm = self.tangent_m[k].mul_(beta1).add_(d, alpha=1 - beta1)
                dv = self.tangent_v[k].mul_(beta2).add_(2 * (1 - beta2) * gi.detach() * d)
                sq = (st["exp_avg_sq"] / c2).sqrt()
                denom = sq + eps
                dsq = dv / (2 * c2 * sq.clamp_min(1e-30))
                du = (lr / c1) * (dm / denom - st["exp_avg"] * dsq / denom**2)
                self.tangent[k].mul_(self.tangent_decay).sub_(du)
        return float(loss.detach())

    def meta_step(self, pt_batch: Any, ft_train_batch: Any, ft_val_batch: Any
                  ) -> dict[str, float]:
        keys = list(self.pt_params)
        with torch.enable_grad():
            theta = {k: v.detach().requires_grad_(True) for k, v in self.pt_params.items()}
            enc = theta if self.encoder is None else self.encoder(theta)
            head = {k: v.detach().requires_grad_(True) for k, v in self.ft_head.items()}
            for _ in range(self.K):  # head-only FT unroll, as Algorithm 1 with head_only
                if not self.head_only:
                    raise NotImplementedError("ForwardModeTrainer unrolls the FT head only")
                ft = self.ft_loss(enc, head, ft_train_batch)
                gh = torch.autograd.grad(ft, list(head.values()), create_graph=True)
                head = {k: v - self.ft_lr * gi for (k, v), gi in zip(head.items(), gh)}
            val = self.ft_loss(enc, head, ft_val_batch)
            g2 = torch.autograd.grad(val, [theta[k] for k in keys], allow_unused=True)
        hyper = sum((gi * self.tangent[k]).sum() for gi, k in zip(g2, keys) if gi is not None)
        hyper = torch.as_tensor(hyper).detach()
        if not bool(torch.isfinite(hyper)):
            raise FloatingPointError(f"non-finite hypergradient at meta step "
                                     f"{self.meta_steps_done}")
        self.meta_opt.zero_grad(set_to_none=True)
        for p in self.hparams.values():
            p.grad = hyper.reshape(p.shape).to(p.dtype).clone()
        self.meta_opt.step()
        with torch.no_grad():
            for k, v in head.items():
                self.ft_head[k].copy_(v.detach())
        self.meta_steps_done += 1
        tn = torch.sqrt(sum((v**2).sum() for v in self.tangent.values()))
        return {"val_loss": float(val.detach()), "hypergrad_norm": float(hyper.abs()),
                "tangent_norm": float(tn), "solve_residual": float("nan")}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["tangent"] = {k: v.clone() for k, v in self.tangent.items()}
        sd["tangent_m"] = {k: v.clone() for k, v in self.tangent_m.items()}
        sd["tangent_v"] = {k: v.clone() for k, v in self.tangent_v.items()}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        with torch.no_grad():
            for name in ("tangent", "tangent_m", "tangent_v"):
                for k, v in getattr(self, name).items():
                    v.copy_(sd[name][k])
