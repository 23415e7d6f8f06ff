"""Peers in the same outer loop: torchopt's implicit differentiation and ``higher``'s unroll.

* ``torchopt_cg`` / ``torchopt_neumann``: ``torchopt.diff.implicit.custom_root`` with the
  optimality function ``torch.func.grad(inner)`` (torchopt's documented pattern) and
  ``torchopt.linear_solve.solve_cg(maxiter=J, rtol=1e-10)`` or
  ``solve_inv(ns=True, maxiter=J, alpha)``; torchopt's pure-python API (its compiled
  extension is not needed). The linear system starts from zero every step:
  ``custom_root`` does not hand its solution back.
* ``higher_unroll``: ``higher.innerloop_ctx`` over the same ``T`` inner SGD steps (all
  recorded), backpropagated to ``h``.

Both reuse the deterministic loop of ``methods.Deterministic`` (same warm inner steps, same
outer step), so only the hypergradient differs.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .methods import Deterministic, State
from .problems import Problem

warnings.filterwarnings("ignore", category=FutureWarning)  # torchopt's functorch.vjp notice


def torchopt_hypergradient(
    P: Problem, theta: torch.Tensor, h: torch.Tensor, solve: Any
) -> torch.Tensor:
    """dL/dh through ``custom_root`` at the inner solution ``theta``."""
    from torchopt.diff.implicit import custom_root

    optimality = torch.func.grad(lambda t, hh: P.inner(t, hh), argnums=0)

    @custom_root(optimality, argnums=1, solve=solve)
    def solution(t: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
        return theta.detach()

    hh = h.detach().requires_grad_(True)
    t_star = solution(theta.detach(), hh)
    (g,) = torch.autograd.grad(P.outer(t_star, hh), hh)
    return g


def torchopt_solve(kind: str, J: int, alpha: float | None = None, tol: float = 1e-10) -> Any:
    """torchopt's solvers. CG's ``rtol=1e-10`` (not 0): at 0 its loop runs until the float32
    residual is exactly 0 and then divides by a zero ``p'Ap`` (ZeroDivisionError)."""
    import torchopt

    if kind == "cg":
        return torchopt.linear_solve.solve_cg(maxiter=J, rtol=tol, atol=0.0)
    if kind == "neumann":
        return torchopt.linear_solve.solve_inv(ns=True, maxiter=J, alpha=alpha)
    raise ValueError(f"kind={kind!r}: expected 'cg' or 'neumann'")


class TorchoptIFT(Deterministic):
    library = "torchopt"

    def __init__(self, name: str, kind: str = "cg", J: int = 10, inner_steps: int = 10):
        super().__init__(name, inner_steps=inner_steps, solver=kind, J=J)
        self.kind, self.J = kind, J

    def hypergradient(self, P: Problem, s: State) -> torch.Tensor:
        alpha = 1.0 / P.smoothness(s.h) if self.kind == "neumann" else None
        g = torchopt_hypergradient(P, s.theta, s.h, torchopt_solve(self.kind, self.J, alpha))
        # matvecs as torchopt's loops spend them: CG one for the start residual + J; Neumann J
        s.hvps = s.hvps + self.J + (1 if self.kind == "cg" else 0)
        s.mixed, s.grads = s.mixed + 1, s.grads + 2
        return g


class _Theta(nn.Module):
    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.detach().clone())


def higher_unroll(
    P: Problem, theta: torch.Tensor, h: torch.Tensor, steps: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL(theta_T, h)/dh, theta_T)`` through ``steps`` recorded SGD steps from ``theta``."""
    import higher

    module = _Theta(theta)
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    hh = h.detach().requires_grad_(True)
    with higher.innerloop_ctx(module, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(P.inner(fmodel.theta, hh))
        (g,) = torch.autograd.grad(P.outer(fmodel.theta, hh), hh)
        theta_T = fmodel.theta.detach()
    return g, theta_T


class HigherUnroll(Deterministic):
    library = "higher"

    def step(self, P: Problem, s: State) -> None:
        g, s.theta = higher_unroll(P, s.theta, s.h, self.inner_steps, 1.0 / P.smoothness(s.h))
        s.grads = s.grads + self.inner_steps + 1
        s.hvps, s.mixed = s.hvps + self.inner_steps, s.mixed + self.inner_steps
        s.g = g.detach()
        s.h = (s.h - P.outer_lr * g).detach()
        s.steps += 1


def peer_methods(quick: bool = False) -> list[Deterministic]:
    return [
        TorchoptIFT("torchopt_cg30", "cg", J=30),
        TorchoptIFT("torchopt_cg10", "cg", J=10),
        TorchoptIFT("torchopt_cg3", "cg", J=3),
        TorchoptIFT("torchopt_neumann10", "neumann", J=10),
        TorchoptIFT("torchopt_cg2_T2", "cg", J=2, inner_steps=2),
        HigherUnroll("higher_unroll", inner_steps=10),
    ]
