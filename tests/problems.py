"""A shared table of bi-level problems with known answers, built on ``hypergrad.testing``.

Each entry makes a :class:`hypergrad.testing.Problem` whose ``params`` is the exact inner
optimum and whose ``hypergrad`` is the exact hypergradient: a closed form where one exists
(quadratics, ridge) or the dense-Hessian IFT reference (logistic regression, whose optimum is
found by Newton's method to machine precision). The entries cover the pytree shapes the library
must handle: a dict, a bare tensor, nested dicts/tuples/lists, an outer loss that depends on the
hyperparameters directly, and a hyperparameter that nothing uses (its hypergradient is zero).

Use ``problem(name)`` or iterate over ``NAMES`` (e.g. in ``pytest.mark.parametrize``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch

import hypergrad as hg
from hypergrad import testing
from hypergrad.testing import Problem


def _split(v: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(v, sizes))


def nested_quadratic(seed: int = 1, dtype: torch.dtype = torch.float64) -> Problem:
    """The quadratic problem with params ``{"a": (2,), "b": ((3,), (2, 2))}`` and hparams
    ``[(2,), {"c": (1,)}]``: the same numbers as ``quadratic_problem`` on flat vectors."""
    base = testing.quadratic_problem(seed=seed, n_params=9, n_hparams=3, cond=30.0, dtype=dtype)

    def to_flat_p(p):
        return {"x": torch.cat([p["a"], p["b"][0], p["b"][1].reshape(-1)])}

    def to_flat_h(h):
        return {"h": torch.cat([h[0], h[1]["c"]])}

    def to_tree_p(x):
        a, b0, b1 = _split(x, [2, 3, 4])
        return {"a": a, "b": (b0, b1.reshape(2, 2))}

    def to_tree_h(x):
        h0, h1 = _split(x, [2, 1])
        return [h0, {"c": h1}]

    return Problem(
        inner_loss=lambda p, h: base.inner_loss(to_flat_p(p), to_flat_h(h)),
        outer_loss=lambda p, h: base.outer_loss(to_flat_p(p), to_flat_h(h)),
        params=to_tree_p(base.params["x"]),
        hparams=to_tree_h(base.hparams["h"]),
        hypergrad=to_tree_h(base.hypergrad["h"]),
        extras=base.extras,
    )


def with_unused_hparam(base: Problem) -> Problem:
    """``base`` with one more hyperparameter leaf, ``"unused"``, that neither loss reads."""
    extra = torch.tensor([0.3, -1.2], dtype=hg.tree.leaves(base.params)[0].dtype)
    return Problem(
        inner_loss=lambda p, h: base.inner_loss(p, h["used"]),
        outer_loss=lambda p, h: base.outer_loss(p, h["used"]),
        params=base.params,
        hparams={"used": base.hparams, "unused": extra},
        hypergrad={"used": base.hypergrad, "unused": torch.zeros_like(extra)},
        extras=base.extras,
    )


def with_direct_term(base: Problem) -> Problem:
    """``base`` with ``0.5 * sum(sin(h)^2)`` added to the outer loss only: the hypergradient
    gains the direct term ``sin(h) cos(h)`` and nothing else."""

    def outer(p, h):
        return base.outer_loss(p, h) + 0.5 * sum(
            (torch.sin(x) ** 2).sum() for x in hg.tree.leaves(h)
        )

    direct = hg.tree.map(lambda x: torch.sin(x) * torch.cos(x), base.hparams)
    return Problem(
        base.inner_loss,
        outer,
        base.params,
        base.hparams,
        hg.tree.add(base.hypergrad, direct),
        base.extras,
    )


def logistic(seed: int = 0, dtype: torch.dtype = torch.float64) -> Problem:
    """Logistic regression; ``hypergrad`` filled from the dense-Hessian reference."""
    p = testing.logistic_problem(seed=seed, dtype=dtype)
    p.hypergrad = testing.reference_implicit_grad(p.inner_loss, p.outer_loss, p.params, p.hparams)
    return p


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "quadratic": lambda: testing.quadratic_problem(seed=0, n_params=6, n_hparams=3, cond=10.0),
    "quadratic_cond1e3": lambda: testing.quadratic_problem(
        seed=3, n_params=10, n_hparams=4, cond=1e3
    ),
    "ridge": lambda: testing.ridge_problem(seed=0, n_features=8),
    "ridge_underdetermined": lambda: testing.ridge_problem(seed=2, n_features=10, n_train=6),
    "logistic": lambda: logistic(seed=0),
    "nested_pytrees": nested_quadratic,
    "unused_hparam": lambda: with_unused_hparam(testing.ridge_problem(seed=4, n_features=4)),
    "direct_term": lambda: with_direct_term(testing.quadratic_problem(seed=5)),
}
NAMES = list(PROBLEMS)


@functools.cache
def _cached(name: str) -> Problem:
    return PROBLEMS[name]()


def problem(name: str) -> Problem:
    """A fresh copy of the table's problem ``name`` (built once per session, then copied, so a
    test that modifies its tensors cannot affect another)."""
    return copy.deepcopy(_cached(name))
