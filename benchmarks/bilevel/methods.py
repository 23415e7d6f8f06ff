"""hypergrad's bilevel methods, each a small outer loop built from the library's primitives.

A method keeps a ``State`` (inner ``theta``, outer ``h``, linear-system solution ``v``, oracle
counters) and advances it by one outer step. Deterministic methods (full batch, as
BenchOpt's ``jaxopt_*`` solvers) share one loop: ``inner_steps`` warm-started gradient steps
on theta (step ``1 / L``), one hypergradient, one outer gradient step (``P.outer_lr``):

  ift_cg_cold    implicit_grad, CG from zero (``J`` iterations or ``tol``)
  ift_cg_warm    implicit_grad, CG from the previous solution ``v`` (x0=)
  neumann        implicit_grad, truncated Neumann series, alpha = 1 / L
  nystrom        implicit_grad, Nystrom rank-k inverse, rho = 0.1 (a smaller rho amplifies
                 the directions the sketch misses by 1 / rho: it diverged on ijcnn1 at 1e-2)
  fd_cg_warm     ift_cg_warm with products="finite_difference" (first order: two gradients)
  sama           implicit_grad with hg.sama (alpha = inner step, no Hessian product)
  unroll         hg.unroll over the inner steps (last ``K`` recorded), backprop to h
  amortized      AmIGO-style deterministic: 1-2 warm inner steps and a warm ``J``-step CG

Stochastic methods draw batches of 64 (BenchOpt's batch size):

  soba           SOBA (Dagreou et al. 2022): one step on theta, v and h per iteration, the
                 three inner oracles (gradient, Hv, mixed product) from one HessianOperator
  amigo          AmIGO (Arbel & Mairal 2022): ``T`` SGD steps on theta, ``T`` on the linear
                 system (both warm), one stochastic outer step

Counters: ``grads`` (gradients), ``hvps`` (Hessian-vector products), ``mixed`` (mixed
products), each in full-batch units (a batch of 64 counts 64 / n). Gradient-equivalents are
their sum (a product costs about one extra backward of the same graph).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

import hypergrad as hg

from .problems import Problem

BATCH = 64


@dataclasses.dataclass
class State:
    theta: torch.Tensor
    h: torch.Tensor
    gen: torch.Generator
    v: torch.Tensor | None = None
    g: torch.Tensor | None = None  # the last hypergradient estimate (at the previous h)
    grads: Any = 0.0  # tensors or floats: read only when evaluated (no host sync per step)
    hvps: Any = 0.0
    mixed: Any = 0.0
    steps: int = 0

    def counts(self) -> dict[str, float]:
        c = {k: float(getattr(self, k)) for k in ("grads", "hvps", "mixed")}
        c["grad_equivalents"] = sum(c.values())
        c["steps"] = self.steps
        return c


def inner_gd(
    P: Problem, theta: torch.Tensor, h: torch.Tensor, steps: int, lr: float
) -> torch.Tensor:
    """``steps`` full-batch gradient steps on the inner loss (no graph kept)."""
    h = h.detach()
    for _ in range(steps):
        t = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(P.inner(t, h), t)
        theta = t.detach() - lr * g
    return theta.detach()


class Method:
    """Base: ``init`` makes the state at BenchOpt's start, ``step`` makes one outer step."""

    name = "method"
    library = "hypergrad"
    stochastic = False

    def __init__(self, name: str | None = None, **cfg: Any):
        self.name = name or self.name
        self.cfg = cfg

    def init(self, P: Problem, seed: int) -> State:
        gen = torch.Generator(device=P.theta0.device).manual_seed(seed)
        return State(theta=P.theta0.clone(), h=P.h0.clone(), gen=gen)

    def step(self, P: Problem, s: State) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.cfg.items())


class Deterministic(Method):
    """Warm inner gradient steps, one hypergradient, one outer gradient step."""

    def __init__(self, name: str | None = None, inner_steps: int = 10, **cfg: Any):
        super().__init__(name, inner_steps=inner_steps, **cfg)
        self.inner_steps = inner_steps

    def hypergradient(self, P: Problem, s: State) -> torch.Tensor:
        raise NotImplementedError

    def step(self, P: Problem, s: State) -> None:
        s.theta = inner_gd(P, s.theta, s.h, self.inner_steps, 1.0 / P.smoothness(s.h))
        s.grads = s.grads + self.inner_steps
        g = self.hypergradient(P, s)
        s.g = g.detach()
        s.h = (s.h - P.outer_lr * g).detach()
        s.steps += 1


class IFT(Deterministic):
    """``hg.implicit_grad`` with a solver; ``warm`` passes the previous solution as ``x0``."""

    def __init__(
        self,
        name: str,
        solver: str = "cg",
        *,
        warm: bool = False,
        J: int = 10,
        tol: float = 0.0,
        products: str = "exact",
        inner_steps: int = 10,
        **kw: Any,
    ):
        super().__init__(
            name,
            inner_steps=inner_steps,
            solver=solver,
            warm=warm,
            J=J,
            tol=tol,
            products=products,
            **kw,
        )
        self.solver, self.warm, self.J, self.tol, self.products, self.kw = (
            solver,
            warm,
            J,
            tol,
            products,
            kw,
        )

    def make_solver(self, P: Problem, s: State) -> Callable:
        if self.solver == "cg":
            x0 = s.v if self.warm else None
            return functools.partial(hg.cg, maxiter=self.J, tol=self.tol, x0=x0)
        if self.solver == "neumann":
            return functools.partial(hg.neumann, iterations=self.J, alpha=1.0 / P.smoothness(s.h))
        if self.solver == "nystrom":
            return functools.partial(
                hg.nystrom, rank=self.J, rho=self.kw.get("rho", 0.1), seed=s.steps
            )
        if self.solver == "sama":
            return functools.partial(hg.sama, alpha=1.0 / P.smoothness(s.h))
        raise ValueError(f"solver={self.solver!r}")

    def hypergradient(self, P: Problem, s: State) -> torch.Tensor:
        g, info = hg.implicit_grad(
            P.bind(P.inner),
            P.bind(P.outer),
            s.theta,
            s.h,
            solver=self.make_solver(P, s),
            return_info=True,
            stationarity_tol=None,
            on_failure="ignore",
            products=self.products,
        )
        res = info["solve"]
        s.v = res.solution.detach()
        s.hvps = s.hvps + res.iterations
        s.mixed = s.mixed + 1
        s.grads = s.grads + 2  # the outer gradient and the inner gradient graph
        return g


class Unroll(Deterministic):
    """Truncated unroll: the inner steps themselves, the last ``K`` recorded (hg.unroll)."""

    def __init__(self, name: str = "unroll", inner_steps: int = 10, K: int = 5):
        super().__init__(name, inner_steps=inner_steps, K=K)
        self.K = K

    def step(self, P: Problem, s: State) -> None:
        h = s.h.detach().requires_grad_(True)
        step = hg.gradient_step(P.bind(P.inner), 1.0 / P.smoothness(s.h))
        theta = hg.unroll(step, s.theta.detach(), h, self.inner_steps, truncate=self.K)
        (g,) = torch.autograd.grad(P.outer(theta, h), h)
        s.theta = theta.detach()
        s.grads = s.grads + self.inner_steps + 1
        s.hvps = s.hvps + self.K
        s.mixed = s.mixed + self.K
        s.g = g.detach()
        s.h = (s.h - P.outer_lr * g).detach()
        s.steps += 1


# ------------------------------------------------------------------------------ stochastic


def _batch(n: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randint(n, (BATCH,), generator=gen, device=device)


def _outer_grads(
    P: Problem, theta: torch.Tensor, h: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    t, hh = theta.detach().requires_grad_(True), h.detach().requires_grad_(True)
    gt, gh = torch.autograd.grad(P.outer(t, hh, idx), (t, hh), allow_unused=True)
    return gt, (torch.zeros_like(hh) if gh is None else gh)


class Stochastic(Method):
    stochastic = True

    def __init__(
        self,
        name: str | None = None,
        *,
        inner_lr: float = 0.5,
        outer_ratio: float | None = None,
        **cfg: Any,
    ):
        super().__init__(name, inner_lr=inner_lr, outer_ratio=outer_ratio, **cfg)
        self.inner_lr, self.outer_ratio = inner_lr, outer_ratio

    def init(self, P: Problem, seed: int) -> State:
        s = super().init(P, seed)
        s.v = torch.zeros_like(s.theta)
        return s

    def lrs(self, P: Problem, h: torch.Tensor) -> tuple[float, float]:
        """Inner step ``inner_lr / L``; outer step ``P.outer_lr * inner_lr / outer_ratio``
        (``outer_ratio``: BenchOpt's name; default the problem's)."""
        ratio = P.outer_ratio if self.outer_ratio is None else self.outer_ratio
        return self.inner_lr / P.smoothness(h), P.outer_lr * self.inner_lr / ratio


class SOBA(Stochastic):
    """theta -= rho grad_B f;  v -= rho (H_B v - grad_B' L);  h -= gamma (grad_h L - mixed_B v)."""

    name = "soba"

    def step(self, P: Problem, s: State) -> None:
        rho, gamma = self.lrs(P, s.h)
        dev = s.theta.device
        idx, jdx = _batch(P.n_inner, s.gen, dev), _batch(P.n_outer, s.gen, dev)
        op = hg.HessianOperator(P.bind(P.inner, idx), s.theta, s.h, ())
        Hv, mixed = op(s.v), op.mixed_vjp(s.v)
        gt, gh = _outer_grads(P, s.theta, s.h, jdx)
        s.g = (gh - mixed).detach()
        s.theta = (s.theta - rho * op.grad).detach()
        s.v = (s.v - rho * (Hv - gt)).detach()
        s.h = (s.h - gamma * s.g).detach()
        fi, fo = BATCH / P.n_inner, BATCH / P.n_outer
        s.grads, s.hvps, s.mixed = s.grads + fi + fo, s.hvps + fi, s.mixed + fi
        s.steps += 1


class AmIGO(Stochastic):
    """``T`` warm SGD steps on theta, ``T`` on ``v'Hv / 2 - v'grad L``, one outer step."""

    name = "amigo"

    def __init__(self, name: str | None = None, T: int = 10, **kw: Any):
        super().__init__(name, T=T, **kw)
        self.T = T

    def step(self, P: Problem, s: State) -> None:
        rho, gamma = self.lrs(P, s.h)
        dev, h = s.theta.device, s.h.detach()
        theta = s.theta
        for _ in range(self.T):
            t = theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(P.inner(t, h, _batch(P.n_inner, s.gen, dev)), t)
            theta = t.detach() - rho * g
        gt, gh = _outer_grads(P, theta, h, _batch(P.n_outer, s.gen, dev))
        v = s.v
        for _ in range(self.T):
            Hv = hg.hvp(P.bind(P.inner, _batch(P.n_inner, s.gen, dev)), theta, v, h)
            v = (v - rho * (Hv - gt)).detach()
        mixed = hg.mixed_vjp(P.bind(P.inner, _batch(P.n_inner, s.gen, dev)), theta, h, v)
        s.g = (gh - mixed).detach()
        s.theta, s.v = theta, v
        s.h = (h - gamma * s.g).detach()
        fi, fo = BATCH / P.n_inner, BATCH / P.n_outer
        s.grads = s.grads + self.T * fi + fo
        s.hvps, s.mixed = s.hvps + self.T * fi, s.mixed + fi
        s.steps += 1


def hypergrad_methods(quick: bool = False) -> list[Method]:
    """The hypergrad configurations of the benchmark."""
    return [
        IFT("ift_cg_cold", "cg", J=10),
        IFT("ift_cg_warm", "cg", warm=True, J=3),
        IFT("neumann", "neumann", J=10),
        IFT("nystrom", "nystrom", J=10),
        IFT("fd_cg_warm", "cg", warm=True, J=3, products="finite_difference"),
        IFT("sama", "sama", J=0),
        IFT("amortized", "cg", warm=True, J=2, inner_steps=2),
        Unroll("unroll", inner_steps=10, K=5),
        SOBA(),
        AmIGO(T=10),
    ]
