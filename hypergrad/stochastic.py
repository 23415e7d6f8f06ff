"""Stochastic Hessian-vector products: a fresh minibatch at every matvec.

``stochastic_hvp`` returns a ``matvec`` whose k-th call computes ``H_{B_k} v``, the Hessian of the
inner loss on the k-th batch. Since the loss is a mean over examples, ``E[H_B] = H``: each
product is unbiased. But a solver built on it is not:

- Neumann (Lorraine et al. 2020, and the paper's one-PT-minibatch hypergradient) multiplies
  products of *different* batches, ``prod_j (I - alpha H_{B_j}) b``; with independent batches the
  expectation of the product is the product of expectations, so each Neumann term is unbiased
  and the variance grows with the number of terms. This is the sound choice.
- CG assumes one fixed matrix: its recurrences silently break when H changes between
  iterations. Do not combine CG with a stochastic matvec; fix the batch instead (DESIGN.md).

Bias/variance trade-off: a fixed batch gives a consistent solve of the wrong (one batch) system
(bias O(1/|B|), no variance); fresh batches give unbiased Neumann terms with variance that falls
as 1/|B| per product. Larger batches reduce both.

Example:
    >>> import torch, hypergrad as hg
    >>> X = torch.randn(100, 3)
    >>> loss = lambda w, h, idx: ((X[idx] @ w) ** 2).mean()
    >>> batches = iter([torch.arange(0, 50), torch.arange(50, 100)])
    >>> mv = hg.stochastic_hvp(loss, torch.zeros(3), None, batches)
    >>> hv = mv(torch.ones(3))   # Hessian of the first batch times v
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import _checks
from .products import hvp
from .tree import Tree

__all__ = ["stochastic_hvp"]


def stochastic_hvp(
    inner_loss: Callable[[Tree, Tree, Any], torch.Tensor],
    params: Tree,
    hparams: Tree,
    batches: Iterable[Any],
) -> Callable[[Tree], Tree]:
    """A matvec ``v -> d2 inner_loss(params, hparams, batch_k) / d params2 @ v`` that draws the
    next batch from ``batches`` at every call (raises ``StopIteration`` with a clear message
    when they run out)."""
    _checks.callable_(inner_loss, "inner_loss")
    _checks.tensor_tree(params, "params")
    it = iter(batches)

    def matvec(v: Tree) -> Tree:
        try:
            batch = next(it)
        except StopIteration:
            raise RuntimeError(
                "`batches` ran out: stochastic_hvp needs one batch per Hessian-vector product "
                "(pass an endless iterator, e.g. itertools.cycle over a DataLoader)"
            ) from None
        return hvp(lambda p: inner_loss(p, hparams, batch), params, v)

    return matvec
