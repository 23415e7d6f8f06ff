"""An IFT hypergradient written with torch.func only, so ``vmap``/``jacrev``/``grad`` compose.

:func:`hypergrad.implicit_grad` uses ``torch.autograd.grad`` (fastest: the first-order graph is
built once and reused by every product) and therefore cannot run inside ``torch.func``
transforms. :func:`functional_implicit_grad` computes the same quantity,

    dL/dphi = dL/dphi|direct - (d2f/dphi dtheta) H^{-1} dL/dtheta,

with ``torch.func.vjp`` of ``torch.func.grad`` (reverse-over-reverse; one linearisation reused by
every product) and solver loops with a fixed number of iterations and masked updates (no
branching on tensor values), so it runs under ``torch.func.vmap`` (e.g. per-task hypergradients
or a batch of hyperparameter settings) and can itself be differentiated (``torch.func.jacrev``).

Example:
    >>> import torch, hypergrad as hg
    >>> f = lambda p, h: 0.5 * ((p - h) ** 2).sum()   # p* = h
    >>> L = lambda p, h: (p ** 2).sum()                # dL/dh = 2h
    >>> hs = torch.tensor([[1.0], [2.0], [3.0]])
    >>> torch.func.vmap(lambda h: hg.functional_implicit_grad(f, L, h, h))(hs)
    tensor([[2.],
            [4.],
            [6.]])
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _checks, tree
from .tree import Tree

__all__ = ["functional_implicit_grad", "in_functorch_transform"]


def in_functorch_transform(t: Tree) -> bool:
    """Whether any tensor leaf of ``t`` is being traced by a torch.func transform."""
    return any(
        isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)
        for x in tree.leaves(t)
    )


def _masked_cg(mv: Callable[[Tree], Tree], b: Tree, iterations: int, tol: float) -> Tree:
    """CG with exactly ``iterations`` matvecs; converged lanes stop updating (masked)."""
    x = tree.zeros_like(b)
    r = p = b
    rs = tree.vdot(r, r)
    threshold = (tol**2) * rs
    for _ in range(iterations):
        ap = mv(p)
        pap = tree.vdot(p, ap)
        active = rs > threshold
        safe_pap = torch.where(pap != 0, pap, torch.ones_like(pap))
        step = torch.where(active, rs / safe_pap, torch.zeros_like(rs))
        x = tree.axpy(step, p, x)
        r = tree.axpy(-step, ap, r)
        rs_new = tree.vdot(r, r)
        safe_rs = torch.where(rs != 0, rs, torch.ones_like(rs))
        beta = torch.where(active, rs_new / safe_rs, torch.zeros_like(rs))
        p = tree.axpy(beta, p, r)
        rs = torch.where(active, rs_new, rs)
    return x


def _neumann(mv: Callable[[Tree], Tree], b: Tree, iterations: int, alpha: float) -> Tree:
    p = acc = b
    for _ in range(iterations - 1):
        p = tree.axpy(-alpha, mv(p), p)
        acc = tree.add(acc, p)
    return tree.scale(acc, alpha)


def functional_implicit_grad(
    inner_loss: Callable[[Tree, Tree], torch.Tensor],
    outer_loss: Callable[[Tree, Tree], torch.Tensor],
    params: Tree,
    hparams: Tree,
    *,
    solver: str = "cg",
    iterations: int = 20,
    tol: float = 1e-10,
    alpha: float = 1.0,
    damping: float = 0.0,
) -> Tree:
    """IFT hypergradient composable with torch.func transforms (see module docstring).

    ``solver`` is ``"cg"`` (``iterations`` masked CG steps, lanes stop at ``||r|| <= tol ||b||``)
    or ``"neumann"`` (``iterations`` terms, step ``alpha``). Exactly ``iterations`` products are
    spent whatever the data, which is what makes it batchable. No diagnostics are returned
    (they would be data-dependent); check a representative case with
    :func:`hypergrad.implicit_grad` and ``return_info=True``.
    """
    _checks.callable_(inner_loss, "inner_loss")
    _checks.callable_(outer_loss, "outer_loss")
    iterations = _checks.positive_int(iterations, "iterations")
    tol = _checks.nonneg_number(tol, "tol")
    damping = _checks.nonneg_number(damping, "damping")
    if solver not in ("cg", "neumann"):
        raise ValueError(
            f"`solver` must be 'cg' or 'neumann' for functional_implicit_grad, got {solver!r} "
            "(the callable solvers of hypergrad branch on convergence and cannot be vmapped)"
        )
    alpha = _checks.positive_number(alpha, "alpha")

    grad_p = torch.func.grad(inner_loss, argnums=0)
    # one linearisation of (p, h) -> d f / d p, reused by every product:
    # vjp(v) = (H v, (d2f / dp dh)^T v)   (H is symmetric)
    _, lin = torch.func.vjp(grad_p, params, hparams)

    def mv(v: Tree) -> Tree:
        hv = lin(v)[0]
        return tree.axpy(damping, v, hv) if damping else hv

    dL_dp, dL_dh = torch.func.grad(outer_loss, argnums=(0, 1))(params, hparams)
    if solver == "cg":
        w = _masked_cg(mv, dL_dp, iterations, tol)
    else:
        w = _neumann(mv, dL_dp, iterations, alpha)
    mixed = lin(w)[1]
    return tree.sub(dL_dh, mixed)
