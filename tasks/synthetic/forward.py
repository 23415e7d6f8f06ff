"""Forward-mode (tangent) hypergradient for a scalar phi, from the library's ``hg.step_jvp``.

Algorithm 1 takes d theta_PT / d phi from the IFT at the current PT parameters, whose
short-horizon response has the wrong sign far from 90 degrees in the rotation task (RESULTS.md).
Here the derivative of the actual PT trajectory is carried forward instead (Franceschi et al.
2017): the state ``s = (theta, Adam's m, v)`` and its tangent ``Z = d s / d phi`` advance by

    s', Z' = hg.step_jvp(hg.optimizer_step(L_PT, torchopt.adam(...)), s, phi, decay * Z, U)

at every PT step (``U = 1``, or ``dx/dphi`` when phi acts only through the PT inputs ``x``),
and the hypergradient is ``<dL_val/dtheta, Z_theta>`` after the K-step head-only FT unroll of
Algorithm 1. ``decay`` < 1 weighs phi's effect at step s by ``decay ** (age of s)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torchopt

import hypergrad as hg
from hypergrad import tree

__all__ = ["ForwardModeTrainer"]

_TANGENTS = ("tangent", "tangent_m", "tangent_v")  # Z for theta, Adam's m and v (checkpointed)


class ForwardModeTrainer(hg.MetaPretrainer):
    """``MetaPretrainer`` whose hypergradient is the forward-mode tangent (one plain
    ``torch.optim.Adam`` group for PT, no weight decay / amsgrad; head-only FT). While ``meta``
    is set (not in warm-up) each PT step is torchopt's Adam through ``hg.step_jvp``, reading
    and writing the ``torch.optim.Adam`` state, so warm-up and checkpoints share one state."""

    def __init__(self, *args: Any, tangent_decay: float = 1.0, pt_split: Any = None,
                 **kwargs: Any) -> None:
        """``pt_split = (inputs, loss_x)`` (optional, faster): phi acts only through the PT
        inputs, ``inputs(hparams, batch) -> (x, dx/dphi)`` and
        ``pt_loss(p, h, batch) == loss_x(p, x, batch)``; ``step_jvp`` then differentiates in
        ``x`` with ``U = dx/dphi`` and ``inputs`` is never differentiated twice."""
        super().__init__(*args, **kwargs)
        self.pt_split = pt_split
        if len(self.hparams) != 1 or next(iter(self.hparams.values())).numel() != 1:
            raise ValueError("ForwardModeTrainer needs a single scalar meta-parameter")
        if not self.head_only:
            raise ValueError("ForwardModeTrainer unrolls the FT head only: pass head_only=True")
        opt = self.pt_opt
        if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
            raise TypeError("ForwardModeTrainer linearises plain Adam: use one torch.optim.Adam "
                            f"param group as the PT optimizer, got {type(opt).__name__}")
        g = opt.param_groups[0]
        unsupported = {k: g.get(k) for k in ("weight_decay", "amsgrad", "maximize",
                                              "decoupled_weight_decay") if g.get(k)}
        if unsupported:  # torchopt.adam below would not apply them as torch.optim.Adam does
            raise ValueError(f"ForwardModeTrainer does not differentiate Adam's {unsupported}; "
                             "put weight decay in the PT loss instead")
        dtype = next(iter(self.pt_params.values())).dtype
        # eps_root = the smallest normal number: nu + eps_root == nu unless nu is ~0, where it
        # keeps d sqrt(nu) finite (a coordinate whose gradient is always 0, e.g. a padded pixel)
        self._adam = torchopt.adam(g["lr"], betas=g["betas"], eps=g["eps"],
                                   eps_root=torch.finfo(dtype).tiny)
        self.tangent_decay = float(tangent_decay)
        for name in _TANGENTS:
            setattr(self, name, {k: torch.zeros_like(v) for k, v in self.pt_params.items()})

    def pt_step(self, batch: Any) -> torch.Tensor:
        if not self.meta:
            return super().pt_step(batch)
        keys = list(self.pt_params)
        params = [self.pt_params[k] for k in keys]
        (hk, h0), = self.hparams.items()
        inputs, loss_x = self.pt_split or ((lambda h, b: (h[hk], torch.ones_like(h0))),
                                           (lambda p, x, b: self.pt_loss(p, {hk: x}, b)))
        x, u = inputs(tree.detach(self.hparams), batch)  # U = dx/dphi: one direction
        seen: list[torch.Tensor] = []

        def loss(p: list[torch.Tensor], h: dict[str, torch.Tensor]) -> torch.Tensor:
            seen.append(loss_x(dict(zip(keys, p)), h["x"], batch))
            return seen[0]

        st = [self.pt_opt.state[p] for p in params]
        for s, p in zip(st, params):  # torch.optim.Adam's fresh state, if none yet
            s or s.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                          exp_avg_sq=torch.zeros_like(p))
        adam0 = self._adam.init([p.detach() for p in params])
        # the count in the parameters' dtype and device: float64 bias corrections in float64
        adam = adam0[0]._replace(mu=[s["exp_avg"] for s in st], nu=[s["exp_avg_sq"] for s in st],
                                 count=[s["step"].to(p) for s, p in zip(st, params)])
        state = ([p.detach() for p in params], (adam, *adam0[1:]))
        d = self.tangent_decay
        zs = [[d * getattr(self, n)[k][None] for k in keys] for n in _TANGENTS]
        z_state = (zs[0], (adam._replace(mu=zs[1], nu=zs[2],
                                         count=[p.new_zeros(1) for p in params]), *adam0[1:]))
        (new_p, (new_adam, *_)), (z_p, (z_adam, *_)) = hg.step_jvp(
            hg.optimizer_step(loss, self._adam), state, {"x": x.detach()}, z_state,
            {"x": u.detach()[None]}, self.pt_steps_done)
        with torch.no_grad():
            for i, (k, p, s) in enumerate(zip(keys, params, st)):
                p.copy_(new_p[i])
                s["exp_avg"].copy_(new_adam.mu[i])
                s["exp_avg_sq"].copy_(new_adam.nu[i])
                s["step"] += 1
                for name, z in zip(_TANGENTS, (z_p, z_adam.mu, z_adam.nu)):
                    getattr(self, name)[k].copy_(z[i][0])
        self.pt_steps_done += 1
        return seen[0].detach()

    def meta_step(self, pt_batch: Any, ft_train_batch: Any, ft_val_batch: Any
                  ) -> dict[str, float]:
        keys = list(self.pt_params)
        with torch.enable_grad():
            theta = {k: v.detach().requires_grad_(True) for k, v in self.pt_params.items()}
            enc = theta if self.encoder is None else self.encoder(theta)
            ft_step = hg.gradient_step(lambda hd, e: self.ft_loss(e, hd, ft_train_batch),
                                       self.ft_lr)  # the head-only FT unroll of Algorithm 1
            head = hg.unroll(ft_step, tree.detach(self.ft_head), enc, self.K)
            val = self.ft_loss(enc, head, ft_val_batch)
            g2 = torch.autograd.grad(val, [theta[k] for k in keys], allow_unused=True)
        hyper = sum(((gi * self.tangent[k]).sum() for gi, k in zip(g2, keys) if gi is not None),
                    torch.zeros_like(val))
        tn = torch.sqrt(sum((v**2).sum() for v in self.tangent.values()))
        val_f, hyper_f, tn_f = torch.stack([val.detach(), hyper, tn]).tolist()  # one host read
        if not abs(hyper_f) < float("inf"):
            raise FloatingPointError(f"non-finite hypergradient, meta step {self.meta_steps_done}")
        self.meta_opt.zero_grad(set_to_none=True)
        for p in self.hparams.values():
            p.grad = hyper.reshape(p.shape).to(p.dtype).clone()
        self.meta_opt.step()
        with torch.no_grad():
            for k, v in head.items():
                self.ft_head[k].copy_(v.detach())
        self.meta_steps_done += 1
        return {"val_loss": val_f, "hypergrad_norm": abs(hyper_f), "tangent_norm": tn_f,
                "solve_residual": float("nan")}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **{n: tree.map(torch.clone, getattr(self, n))
                                           for n in _TANGENTS}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        for n in _TANGENTS:
            setattr(self, n, {k: sd[n][k].detach().clone() for k in self.pt_params})
