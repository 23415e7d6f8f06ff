"""Forward mode: Jacobian-vector products of an inner solution and of an optimizer trajectory.

At a stationary point of the inner loss the IFT gives the best-response Jacobian
``d params* / d hparams = -H^{-1} M`` with ``H = d2f/dparams2`` and ``M = d2f/(dparams dhparams)``.

- :func:`implicit_jvp` is its product with one tangent ``u`` (like ``hparams``): one mixed
  product ``M u = d/dparams <df/dhparams, u>`` and one solve with ``H``.
- :func:`implicit_jacobian` is the whole Jacobian, in ``torch.func.jacrev``'s layout. It solves
  for the smaller side (forward: one column per hparam entry, ``-H^{-1} M e_j``; reverse: one
  row per param entry, ``-M^T H^{-1} e_i``), all columns at once: the right-hand sides are
  stacked along a leading dimension, each matvec is one batched backward
  (``is_grads_batched``), and the solver sees one block-diagonal system.
- :func:`forward_hypergrad` carries the tangents ``Z_t = d state_t / d hparams`` along an
  actual optimizer trajectory ``state_{t+1} = step(state_t, hparams, t)`` (Franceschi et al.
  2017, forward mode): ``Z_{t+1} = d step/d state Z_t + d step/d hparams``, one tangent per
  hparam entry, batched. Its memory does not grow with the number of steps; its cost grows with
  the number of hparams. :func:`step_jvp` is one step of it, for online use.

All products are reverse-over-reverse (no ``torch.func`` / forward-mode AD): the Jacobian-vector
product of a step is ``d/dw <J^T w, z>`` through the step's vector-Jacobian product: one
step's product took 4.9 plain steps against 8.6 (SGD) and 9.4 (torchopt Adam) for
``torch.autograd.forward_ad`` dual numbers through the same step (9.6k-parameter MLP, CPU;
benchmarks/RESULTS.md, forward mode).

Example:
    >>> import torch, hypergrad as hg
    >>> f = lambda p, h: 0.5 * ((p - 2 * h) ** 2).sum()   # p* = 2 h
    >>> h = torch.tensor([1.0, 3.0], dtype=torch.float64)
    >>> hg.implicit_jvp(f, 2 * h, h, torch.tensor([1.0, -1.0], dtype=torch.float64)).tolist()
    [2.0, -2.0]
    >>> hg.implicit_jacobian(f, 2 * h, h).tolist()
    [[2.0, 0.0], [0.0, 2.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _checks, tree
from .fixed_point import (
    _call_solver,
    _captured_reason,
    _check_entry,
    _reject_functorch,
)
from .implicit import _stationarity_ratio
from .solvers import SolveResult, cg
from .tree import Tree

__all__ = ["implicit_jvp", "implicit_jacobian", "forward_hypergrad", "step_jvp"]

Loss = Callable[[Tree, Tree], torch.Tensor]
Step = Callable[[Tree, Tree, int], Tree]


# --- batched backward passes --------------------------------------------------------------------
def _neg(x: torch.Tensor) -> torch.Tensor:
    return 0.0 - x  # not -x: exact zeros stay +0.0 (no "-0." in printed Jacobians)


def _zeros_for(x: torch.Tensor, k: int | None) -> torch.Tensor:
    shape = x.shape if k is None else (k, *x.shape)
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


# torch's errors for a backward that vmap (is_grads_batched) cannot batch: no batching rule,
# .item() / data-dependent shapes / random ops under vmap
_NO_BATCHING = ("vmap", "batching rule", "batched grad")


class _Batching:
    """Whether batched backward passes (``is_grads_batched``) work, remembered for one call: after
    the first one fails with a "cannot batch" error, every later product goes row by row at
    once instead of failing again."""

    def __init__(self) -> None:
        self.works = True


def _cannot_batch(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(s in text for s in _NO_BATCHING)


def _grad(
    outputs: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    k: int | None,
    create_graph: bool = False,
    *,
    name: str,
    batching: _Batching,
) -> list[torch.Tensor]:
    """``sum_o d<o, c_o>/d inputs``, batched over a leading dimension of the cotangents when
    ``k`` is an int (one backward per row, vectorised by ``is_grads_batched``); zeros where an
    input is unused. ``outputs`` entries that are ``None`` or constant contribute nothing.

    A second-order backward that torch does not implement raises ``DoubleBackwardError``
    naming ``name``. A batched backward that vmap cannot batch runs one row at a time, and
    ``batching`` remembers it for the rest of the call; any other error is raised."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents)
             if o is not None and o.requires_grad]
    if not pairs:
        return [_zeros_for(x, k) for x in inputs]
    outs, cots = [o for o, _ in pairs], [c for _, c in pairs]
    if k is not None and k == 1:
        cots, batched = [c[0] for c in cots], False
    else:
        batched = k is not None
    gs: Sequence[torch.Tensor | None] | None = None  # None entries: inputs the outputs do not use
    with torch.enable_grad(), _checks.second_order(name, _checks.FORWARD_FIX):
        if batched and batching.works:
            try:
                gs = torch.autograd.grad(outs, list(inputs), cots, retain_graph=True,
                                         create_graph=create_graph, allow_unused=True,
                                         is_grads_batched=True)
            except RuntimeError as e:
                if not _cannot_batch(e):
                    raise
                batching.works = False  # an op with no batching rule: rows from now on
        if gs is None and batched:
            rows = [torch.autograd.grad(outs, list(inputs), [c[i] for c in cots],
                                        retain_graph=True, create_graph=create_graph,
                                        allow_unused=True) for i in range(len(cots[0]))]
            gs = [None if r[0] is None else torch.stack(list(r)) for r in zip(*rows)]
        elif gs is None:
            gs = torch.autograd.grad(outs, list(inputs), cots, retain_graph=True,
                                     create_graph=create_graph, allow_unused=True)
    if k is not None and k == 1:
        gs = [None if g is None else g.unsqueeze(0) for g in gs]
    return [_zeros_for(x, k) if g is None else g for x, g in zip(inputs, gs)]


class _InnerLinearization:
    """The inner loss recorded once at ``(params, hparams)``: ``H v``, ``M u`` and ``M^T w`` as
    backward passes through the gradient graph (batched over a leading dim when ``k`` given)."""

    def __init__(self, inner_loss: Loss, params: Tree, hparams: Tree):
        p_flat, self.p_spec = tree.flatten(params)
        h_flat, self.h_spec = tree.flatten(hparams)
        self.p = [x.detach().requires_grad_(True) for x in p_flat]
        self.h = [x.detach().requires_grad_(True) for x in h_flat]
        gs: Sequence[torch.Tensor | None]  # None: a leaf the loss does not use
        with torch.enable_grad():
            value = _checks.scalar_loss(
                inner_loss(tree.unflatten(self.p, self.p_spec),
                           tree.unflatten(self.h, self.h_spec)), "inner_loss")
            if value.requires_grad:
                with _checks.second_order("inner_loss", _checks.FORWARD_FIX):
                    gs = torch.autograd.grad(value, self.p + self.h, create_graph=True,
                                             allow_unused=True)
            else:
                gs = [None] * (len(self.p) + len(self.h))
            self.captured = _checks.captured_leaves(value, self.p + self.h)
            # a compiled region or a once-differentiable function: raise, not zeros
            _checks.check_once_differentiable(value, self.p + self.h, "inner_loss",
                                              fix=_checks.FORWARD_FIX)
        _checks.check_double_backward(gs, "inner_loss", fix=_checks.FORWARD_FIX)
        self.batching = _Batching()  # one per call: remembers a backward vmap cannot batch
        self.g_p = list(gs[: len(self.p)])
        self.g_h = list(gs[len(self.p):])
        self.grad = [torch.zeros_like(x) if g is None else g.detach()
                     for x, g in zip(self.p, self.g_p)]

    def hvp(self, v: list[torch.Tensor], k: int | None = None) -> list[torch.Tensor]:
        return _grad(self.g_p, self.p, v, k, name="inner_loss", batching=self.batching)

    def mixed_jvp(self, u: list[torch.Tensor], k: int | None = None) -> list[torch.Tensor]:
        """``M u = d/dparams <df/dhparams, u>`` (symmetry of second derivatives)."""
        return _grad(self.g_h, self.p, u, k, name="inner_loss", batching=self.batching)

    def mixed_vjp(self, w: list[torch.Tensor], k: int | None = None) -> list[torch.Tensor]:
        return _grad(self.g_p, self.h, w, k, name="inner_loss", batching=self.batching)

    def matvec(self, k: int | None = None) -> Callable[[Tree], Tree]:
        spec = self.p_spec

        def mv(v: Tree) -> Tree:
            return tree.unflatten(self.hvp(tree.leaves(v), k), spec)

        return mv


def _diagnose(lin: _InnerLinearization, results: list[SolveResult],
              stationarity_tol: float | None) -> dict[str, Any]:
    """Premise checks: converged solves, positive curvature seen by CG, stationarity."""
    info: dict[str, Any] = {"solves": results}
    health = _checks.Health()  # every solve's flags and the stationarity: one host read
    for i, r in enumerate(results):
        health.add(f"converged{i}", r.converged)
        health.add(f"nonpositive{i}", (r.stats or {}).get("nonpositive_curvature", False))
    if stationarity_tol is not None:
        # as implicit_grad: scale-free, one extra matvec
        stationarity = _stationarity_ratio(lin.grad, lin.hvp([x.detach() for x in lin.p]))
        info["stationarity"] = stationarity
        health.add("stationary", stationarity <= stationarity_tol)
    health.read()
    reasons = []
    if lin.captured:
        reasons.append(_captured_reason("inner_loss", lin.captured, "`params` nor `hparams`"))
    if not all(health.get(f"converged{i}") for i in range(len(results))):
        reasons.append("the linear solve did not converge (increase the solver's iterations)")
    nonpos = any(bool(health.get(f"nonpositive{i}")) for i in range(len(results)))
    info["nonpositive_curvature"] = nonpos
    if nonpos:
        reasons.append("the inner Hessian has non-positive curvature (not at a strict minimum)")
    if stationarity_tol is not None and not health["stationary"]:
        reasons.append(
            "`params` is not a stationary point of the inner loss (optimise it further)")
    info["reasons"] = reasons
    info["trusted"] = not reasons
    return info


def _check_inner_entry(name: str, inner_loss: Loss, params: Tree, hparams: Tree, solver: Any,
                       on_failure: str, stationarity_tol: float | None) -> None:
    _check_entry(name, inner_loss, params, hparams, solver, on_failure, stationarity_tol,
                 names=("inner_loss", "params", "stationarity_tol"))


# --- implicit_jvp ---------------------------------------------------------------------------------
def implicit_jvp(
    inner_loss: Loss,
    params: Tree,
    hparams: Tree,
    tangents: Tree,
    *,
    solver: Callable[..., SolveResult] | None = None,
    return_info: bool = False,
    on_failure: str = "warn",
    stationarity_tol: float | None = 1e-3,
) -> Tree | tuple[Tree, dict[str, Any]]:
    """Forward-mode IFT: ``(d params*/d hparams) u = -H^{-1} (d2f/dparams dhparams) u``.

    Args:
        inner_loss: ``f(params, hparams) -> scalar``; ``params`` must (approximately) minimise it.
        params: the inner optimum. hparams: pytree of floating tensors of ``params``' dtype.
        tangents: ``u``, a pytree like ``hparams`` (the direction in hyperparameter space).
        solver: ``solver(matvec, b) -> SolveResult`` for ``H x = M u``; default ``hg.cg``.
        return_info, on_failure, stationarity_tol: as :func:`hypergrad.implicit_grad` (the
            info dict has ``"solves"``, ``"stationarity"``, ``"nonpositive_curvature"``,
            ``"reasons"``, ``"trusted"``); one more reason is an ``inner_loss`` that uses a
            tensor requiring grad outside ``params`` and ``hparams`` (a captured weight).

    Returns a pytree like ``params``. Cost: one gradient graph of ``f``, one mixed product,
    the solver's matvecs, one matvec for the stationarity check; three host reads (NaN/inf in
    the inputs, in ``tangents``, and the diagnosis) plus whatever the solver reads.
    """
    solver = cg if solver is None else solver
    _check_inner_entry("implicit_jvp", inner_loss, params, hparams, solver, on_failure,
                       stationarity_tol)
    _checks.like(tangents, "tangents", hparams, "hparams")
    _checks.finite(tangents, "tangents")
    lin = _InnerLinearization(inner_loss, params, hparams)
    rhs = tree.unflatten(lin.mixed_jvp(tree.leaves(tangents)), lin.p_spec)
    res = _call_solver(solver, lin.matvec(), rhs)
    out = tree.map(_neg, res.solution)
    info = _diagnose(lin, [res], stationarity_tol)
    _checks.report_failure(info["reasons"], on_failure, stacklevel=3)
    return (out, info) if return_info else out


# --- implicit_jacobian ------------------------------------------------------------------------
def _basis(leaves: list[torch.Tensor], rows: range) -> list[torch.Tensor]:
    """Rows ``rows`` of the identity over the concatenated entries of ``leaves``, split into
    leaf-shaped blocks: leaf ``j`` gets a tensor of shape ``(len(rows), *leaf_j.shape)``."""
    out, offset = [], 0
    for x in leaves:
        m = x.numel()
        e = torch.zeros(len(rows), m, dtype=x.dtype, device=x.device)
        lo, hi = max(rows.start, offset), min(rows.stop, offset + m)
        if lo < hi:
            r = torch.arange(lo, hi, device=x.device)
            e[r - rows.start, r - offset] = 1
        out.append(e.reshape(len(rows), *x.shape))
        offset += m
    return out


def _solve_stacked(solver, lin: _InnerLinearization, rhs: list[torch.Tensor], k: int
                   ) -> tuple[list[torch.Tensor], SolveResult]:
    """``H X = B`` for ``k`` right-hand sides stacked on dim 0, as one block-diagonal system.
    Columns are scaled to unit norm first, so the solver's relative tolerance applies to each
    column alike (the joint residual of unit columns bounds every column's own)."""
    sq = sum(x.reshape(k, -1).pow(2).sum(1) for x in rhs)
    assert isinstance(sq, torch.Tensor)  # rhs (leaves of params) is non-empty
    norms = torch.sqrt(sq)
    scale = torch.where(norms > 0, norms, torch.ones_like(norms))

    def per_col(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s.reshape(k, *([1] * (x.dim() - 1)))

    b = [x / per_col(x, scale) for x in rhs]
    res = _call_solver(solver, lin.matvec(k), tree.unflatten(b, lin.p_spec))
    sol = [x * per_col(x, scale) for x in tree.leaves(res.solution)]
    return sol, res


def _jacobian_blocks(out_leaves: list[torch.Tensor], in_leaves: list[torch.Tensor],
                     rows: list[torch.Tensor], transpose: bool) -> list[list[torch.Tensor]]:
    """Cut stacked rows into jacrev blocks ``J[i][j]`` of shape ``out_i.shape + in_j.shape``.

    ``rows`` are leaf-shaped with a leading dim running over the concatenated entries of
    ``in_leaves`` (forward mode: ``rows[i]`` has shape ``(n_in, *out_i.shape)``); with
    ``transpose`` the roles swap (reverse mode: ``rows[j]`` is ``(n_out, *in_j.shape)``)."""
    blocks: list[list[torch.Tensor]] = []
    offsets = [0]
    for x in (out_leaves if transpose else in_leaves):
        offsets.append(offsets[-1] + x.numel())
    for i, o in enumerate(out_leaves):
        row = []
        for j, h in enumerate(in_leaves):
            if not transpose:  # rows[i][in entries of leaf j] -> (*h, *o) -> (*o, *h)
                blk = rows[i][offsets[j]:offsets[j + 1]].reshape(*h.shape, *o.shape)
                blk = blk.permute(*range(h.dim(), h.dim() + o.dim()), *range(h.dim()))
            else:  # rows[j][out entries of leaf i] -> (*o, *h)
                blk = rows[j][offsets[i]:offsets[i + 1]].reshape(*o.shape, *h.shape)
            row.append(blk.contiguous())
        blocks.append(row)
    return blocks


def implicit_jacobian(
    inner_loss: Loss,
    params: Tree,
    hparams: Tree,
    *,
    solver: Callable[..., SolveResult] | None = None,
    mode: str = "auto",
    batch_size: int | None = None,
    return_info: bool = False,
    on_failure: str = "warn",
    stationarity_tol: float | None = 1e-3,
) -> Tree | tuple[Tree, dict[str, Any]]:
    """The best-response Jacobian ``d params*/d hparams = -H^{-1} d2f/(dparams dhparams)``.

    Layout as ``torch.func.jacrev`` of a function ``hparams -> params``: a tensor maps to a
    tensor of shape ``params.shape + hparams.shape``; a pytree maps to the ``params`` structure
    whose leaves are pytrees like ``hparams`` (leaf ``(i, j)`` of shape
    ``params_i.shape + hparams_j.shape``).

    Args:
        inner_loss, params, hparams, return_info, on_failure, stationarity_tol: as
            :func:`implicit_jvp`.
        solver: applied to one stacked, block-diagonal system per batch of right-hand sides
            (each matvec is one batched Hessian product); default ``hg.cg``.
        mode: ``"forward"`` (one solve per hparam entry), ``"reverse"`` (one per param entry)
            or ``"auto"`` (the smaller count; ties go forward).
        batch_size: right-hand sides per stacked solve (``None``: all at once). Memory grows
            with it: the solver keeps a few vectors of ``batch_size x`` the larger side.

    Example:
        >>> import torch, hypergrad as hg
        >>> f = lambda p, h: 0.5 * (p ** 2).sum() - (p * h.sum()).sum()   # p* = sum(h) 1
        >>> h = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> J = hg.implicit_jacobian(f, torch.full((3,), 3.0, dtype=torch.float64), h)
        >>> J.shape, J[0].tolist()
        (torch.Size([3, 2]), [1.0, 1.0])
    """
    solver = cg if solver is None else solver
    _check_inner_entry("implicit_jacobian", inner_loss, params, hparams, solver, on_failure,
                       stationarity_tol)
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"`mode` must be 'auto', 'forward' or 'reverse', got {mode!r}")
    if batch_size is not None:
        batch_size = _checks.positive_int(batch_size, "batch_size")
    p_flat, h_flat = tree.leaves(params), tree.leaves(hparams)
    n_p, n_h = tree.numel(params), tree.numel(hparams)
    if mode == "auto":
        mode = "forward" if n_h <= n_p else "reverse"
    n = n_h if mode == "forward" else n_p
    chunk = n if batch_size is None else min(batch_size, n)
    lin = _InnerLinearization(inner_loss, params, hparams)
    parts: list[list[torch.Tensor]] = []
    results = []
    for start in range(0, n, chunk):
        rows = range(start, min(start + chunk, n))
        k = len(rows)
        if mode == "forward":  # X = H^{-1} M E (columns e_j over hparam entries)
            rhs = lin.mixed_jvp(_basis(h_flat, rows), k)
            sol, res = _solve_stacked(solver, lin, rhs, k)
            parts.append([_neg(x) for x in sol])
        else:  # rows of J: -(M^T H^{-1} e_i) over param entries (H symmetric)
            sol, res = _solve_stacked(solver, lin, _basis(p_flat, rows), k)
            parts.append([_neg(x) for x in lin.mixed_vjp(sol, k)])
        results.append(res)
    stacked = [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]
    blocks = _jacobian_blocks(p_flat, h_flat, stacked, transpose=(mode == "reverse"))
    jac = tree.unflatten([tree.unflatten(row, lin.h_spec) for row in blocks], lin.p_spec)
    info = _diagnose(lin, results, stationarity_tol)
    info["mode"] = mode
    _checks.report_failure(info["reasons"], on_failure, stacklevel=3)
    return (jac, info) if return_info else jac


# --- forward-mode hypergradient along a trajectory ----------------------------------------------
def _tangent_leaf_ok(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _step_jvp(step: Step, state: Tree, hparams: Tree, s_tan: list[torch.Tensor],
              h_tan: list[torch.Tensor], k: int, t: int, spec: Any, batching: _Batching,
              check: bool = False) -> tuple[Tree, list[torch.Tensor]]:
    """One step and its Jacobian-vector products (internal: inputs already validated).

    ``J z = d/dw <J^T w, z>``: the step is recorded once, its vector-Jacobian product is built
    with a graph (linear in the dummy cotangent ``w``), and one batched backward through that
    graph gives all ``k`` products. A step whose second-order products torch cannot take (an
    op with no double backward, a gradient through a ``torch.compile``-d loss) raises
    ``DoubleBackwardError``."""
    s_flat = tree.leaves(state)
    s_in = [x.detach().requires_grad_(True) if _tangent_leaf_ok(x) else x for x in s_flat]
    h_in = [x.detach().requires_grad_(True) for x in tree.leaves(hparams)]
    diff_in = [x for x in s_in if _tangent_leaf_ok(x)] + h_in
    tangents_in = [z for x, z in zip(s_in, s_tan) if _tangent_leaf_ok(x)] + h_tan
    with torch.enable_grad():
        out = step(tree.unflatten(s_in, spec), tree.unflatten(h_in, tree.flatten(hparams)[1]), t)
        out_flat, out_spec = tree.flatten(out)
        if out_spec != spec:
            raise ValueError(
                f"`step` must return a pytree of the structure of `params`; at t={t} it "
                f"returned {out_spec} instead of {spec}")
        live = [i for i, o in enumerate(out_flat) if _tangent_leaf_ok(o) and o.requires_grad]
        if check:
            found = _checks.captured_leaves([out_flat[i] for i in live], diff_in)
            if found:
                _checks.report_failure(
                    [_captured_reason("step", found, "the state nor `hparams`")], "warn",
                    stacklevel=4)
        # a gradient taken inside the step through a compiled region: its derivative is lost
        _checks.check_double_backward([out_flat[i] for i in live], "step", stop=diff_in,
                                      fix=_checks.FORWARD_FIX)
        ws = [torch.zeros_like(out_flat[i], requires_grad=True) for i in live]
        vjps: Sequence[torch.Tensor | None]  # None: an input the step does not use
        if live:
            with _checks.second_order("step", _checks.FORWARD_FIX):
                vjps = torch.autograd.grad([out_flat[i] for i in live], diff_in, ws,
                                           create_graph=True, allow_unused=True)
        else:
            vjps = [None] * len(diff_in)
    jz = _grad(list(vjps), ws, tangents_in, k, name="step", batching=batching) if live else []
    new_tan = [_zeros_for(o, k) for o in out_flat]
    for i, z in zip(live, jz):
        new_tan[i] = z.detach()
    new_state = [o.detach() if isinstance(o, torch.Tensor) else o for o in out_flat]
    return tree.unflatten(new_state, spec), new_tan


def _check_tangents(tangents: Tree, name: str, ref: Tree, ref_name: str) -> int:
    """``tangents`` is like ``ref`` with one leading dim ``k`` on every leaf; returns ``k``."""
    t_flat, t_spec = tree.flatten(tangents)
    r_flat, r_spec = tree.flatten(ref)
    if t_spec != r_spec:
        raise ValueError(f"`{name}` must have the structure of `{ref_name}`, got {t_spec} "
                         f"instead of {r_spec}")
    ks = set()
    for i, (z, x) in enumerate(zip(t_flat, r_flat)):
        if not isinstance(z, torch.Tensor) or z.dim() != x.dim() + 1 or z.shape[1:] != x.shape:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(
                f"`{name}` leaf {i} must have shape (k, *{tuple(x.shape)}) (one row per "
                f"tangent direction), got {got}")
        if _tangent_leaf_ok(x) and (z.dtype != x.dtype or z.device != x.device):
            raise TypeError(f"`{name}` leaf {i} has dtype {z.dtype} on {z.device}; "
                            f"`{ref_name}` leaf {i} has {x.dtype} on {x.device}")
        ks.add(z.shape[0])
    if len(ks) != 1 or 0 in ks:
        raise ValueError(f"`{name}` leaves must share one leading dim k >= 1, got {sorted(ks)}")
    return ks.pop()


def step_jvp(
    step: Step,
    state: Tree,
    hparams: Tree,
    state_tangents: Tree,
    hparams_tangents: Tree,
    t: int = 0,
) -> tuple[Tree, Tree]:
    """One step ``state' = step(state, hparams, t)`` and its tangents
    ``Z' = (d step/d state) Z + (d step/d hparams) U``, for ``k`` directions at once.

    ``state_tangents`` is a pytree like ``state`` whose leaves have a leading dim ``k``
    (``Z``, e.g. ``d state / d hparams`` along ``k`` directions); ``hparams_tangents`` is like
    ``hparams`` with the same leading dim (``U``: the identity rows for exact derivatives,
    or the derivative of a reparametrised input, e.g. ``dx/dphi`` when ``hparams = {"x": x}``).
    Non-floating state leaves (optimizer step counts) get zero tangents. Returns the new state
    (detached) and its tangents: chain calls to carry ``d state_t / d hparams`` forward online.

    Example:
        >>> import torch, hypergrad as hg
        >>> step = hg.gradient_step(lambda p, h: 0.5 * ((p - h) ** 2).sum(), lr=0.5)
        >>> p, z = hg.step_jvp(step, torch.zeros(1), torch.ones(1),
        ...                    torch.zeros(1, 1), torch.ones(1, 1))
        >>> p.tolist(), z.tolist()    # p' = p - 0.5 (p - h): dp'/dh = 0.5
        ([0.5], [[0.5]])
    """
    _checks.callable_(step, "step")
    _check_step_inputs(state, hparams, "state")
    k = _check_tangents(state_tangents, "state_tangents", state, "state")
    k_h = _check_tangents(hparams_tangents, "hparams_tangents", hparams, "hparams")
    if k != k_h:
        raise ValueError(f"`state_tangents` and `hparams_tangents` must share the leading dim "
                         f"(one row per direction), got {k} and {k_h}")
    spec = tree.flatten(state)[1]
    new_state, new_tan = _step_jvp(step, state, hparams, tree.leaves(state_tangents),
                                   tree.leaves(hparams_tangents), k, t, spec, _Batching(),
                                   check=True)
    return new_state, tree.unflatten(new_tan, spec)


def _check_step_inputs(state: Tree, hparams: Tree, state_name: str) -> None:
    _reject_functorch("forward mode", state, hparams)
    s_flat = tree.leaves(state)
    if not s_flat or not any(_tangent_leaf_ok(x) for x in s_flat):
        raise ValueError(f"`{state_name}` must be a pytree with at least one floating tensor, "
                         f"got {state!r:.200}")
    bad = [i for i, x in enumerate(s_flat) if not isinstance(x, torch.Tensor)]
    if bad:
        raise TypeError(f"`{state_name}` must contain only tensors; leaf {bad[0]} is "
                        f"{type(s_flat[bad[0]]).__name__}")
    h_flat = _checks.tensor_tree(hparams, "hparams")
    ref = next(x for x in s_flat if _tangent_leaf_ok(x))
    _checks.same_dtype(h_flat, "hparams", [ref] * len(h_flat), state_name)
    _checks.finite_trees((state, state_name), (hparams, "hparams"))


def forward_hypergrad(
    step: Step,
    params: Tree,
    hparams: Tree,
    steps: int,
    outer_loss: Loss,
    *,
    return_state: bool = False,
    progress: bool = False,
) -> Tree | tuple[Tree, Tree]:
    """``dL(state_T(h), h) / dh`` along ``state_{t+1} = step(state_t, h, t)`` by forward mode
    (Franceschi et al. 2017): ``Z_{t+1} = d step/d state Z_t + d step/d hparams``, ``Z_0 = 0``,
    then ``dL/dh = dL/dh|direct + Z_T^T dL/dstate_T``.

    Args:
        step: as for :func:`hypergrad.unroll`: ``step(state, hparams, t) -> state``, e.g.
            ``hg.gradient_step(f, lr)`` or ``hg.optimizer_step(f, torchopt.adam(lr))`` (whose
            state is ``(params, opt_state)``). It must be differentiable (it is).
        params: the initial state ``state_0`` (constant in ``hparams``).
        hparams: pytree of floating tensors; one tangent per entry (``numel(hparams)`` in all),
            all carried at once.
        steps: ``T``. outer_loss: ``L(state_T, hparams) -> scalar`` on the final state (for
            ``optimizer_step``: ``lambda s, h: val(s[0], h)``).
        return_state: also return ``state_T`` (detached).
        progress: a tqdm bar over the steps.

    With torchopt's Adam, pass ``eps_root > 0`` (e.g. ``torchopt.adam(lr, eps_root=1e-30)``)
    when some gradient coordinates are exactly zero (unused inputs, padding): ``d sqrt(nu)/d nu``
    is infinite at ``nu = 0`` and the tangent there becomes ``0 * inf = NaN`` (reverse mode
    gets NaN too when such a coordinate feeds the outer loss through a graph; for a coordinate
    the loss never uses, its constant zero gradient hides it).

    Warns (:class:`HypergradientWarning`) if the first step uses a tensor that requires grad
    but is in neither the state nor ``hparams`` (its influence would be silently missing), and
    if the result is not finite.

    Equals the full reverse-mode ``unroll`` to rounding. Memory: the state, its ``numel(hparams)``
    tangents and one step's graph, whatever ``steps``; time: about one step's
    vector-Jacobian product plus ``numel(hparams)`` batched backward passes per step.

    Example:
        >>> import torch, hypergrad as hg
        >>> f = lambda p, h: 0.5 * ((p - h) ** 2).sum()
        >>> h = torch.tensor([2.0])
        >>> g = hg.forward_hypergrad(hg.gradient_step(f, lr=0.5), torch.zeros(1), h, 30,
        ...                          lambda p, h: p.sum())
        >>> round(float(g), 6)     # p_T = (1 - 0.5^T) h
        1.0
    """
    _checks.callable_(step, "step")
    _checks.callable_(outer_loss, "outer_loss")
    steps = _checks.nonneg_int(steps, "steps")
    _check_step_inputs(params, hparams, "params")
    s_flat, spec = tree.flatten(params)
    h_flat, h_spec = tree.flatten(hparams)
    n = tree.numel(hparams)
    U = _basis(h_flat, range(n))
    Z = [_zeros_for(x, n) for x in s_flat]
    state = tree.detach(params)
    it: Any = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="forward_hypergrad", leave=False)
    batching = _Batching()  # one for the whole trajectory
    for t in it:
        state, Z = _step_jvp(step, state, hparams, Z, U, n, t, spec, batching, check=(t == 0))
    # dL/dh = direct + sum over state leaves of <dL/dstate_leaf, Z_leaf[row]> for every row
    st = [x.detach().requires_grad_(True) if _tangent_leaf_ok(x) else x
          for x in tree.leaves(state)]
    hs = [x.detach().requires_grad_(True) for x in h_flat]
    diff = [x for x in st if _tangent_leaf_ok(x)]
    with torch.enable_grad():
        L = _checks.scalar_loss(outer_loss(tree.unflatten(st, spec), tree.unflatten(hs, h_spec)),
                                "outer_loss")
        grads = (torch.autograd.grad(L, diff + hs, allow_unused=True) if L.requires_grad
                 else [None] * (len(diff) + len(hs)))
    g_state = iter(grads[: len(diff)])
    total = torch.zeros(n, dtype=h_flat[0].dtype, device=h_flat[0].device)
    for x, z in zip(st, Z):
        if _tangent_leaf_ok(x):
            g = next(g_state)
            if g is not None:
                total = total + z.reshape(n, -1) @ g.reshape(-1)
    direct = [torch.zeros_like(x) if g is None else g for x, g in zip(hs, grads[len(diff):])]
    out, offset = [], 0
    for x, d in zip(h_flat, direct):
        m = x.numel()
        out.append(d + total[offset:offset + m].reshape(x.shape))
        offset += m
    hypergrad = tree.unflatten(out, h_spec)
    if not bool(torch.isfinite(total).all()):
        _checks.report_failure(
            ["the forward-mode tangents are not finite (with torchopt Adam and a gradient "
             "coordinate that stays exactly 0, pass eps_root > 0, e.g. 1e-30)"], "warn",
            stacklevel=3)
    if return_state:
        return hypergrad, state
    return hypergrad
