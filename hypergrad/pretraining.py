"""The two-stage hypergradient of "Meta-Learning to Improve Pre-Training" (Raghu et al. 2021).

The meta-objective is g(phi) = L_FT(Alg_FT(Alg_PT(phi))), and Algorithm 1 differentiates it as
(their Eq. 2-4)

    dg/dphi = dL_val/d(theta_FT(K), psi_FT(K))  x  d(theta_FT(K), psi_FT(K))/d theta_PT
              x  d theta_PT/d phi,

    d theta_PT/d phi = -[d2 L_PT / d theta d theta^T]^{-1} d2 L_PT / d theta d phi^T     (IFT)

with the FT Jacobian from K differentiable fine-tuning steps started at theta_FT(0) = theta_PT.
Here it is literally the library's primitives composed: ``implicit_solution`` (the IFT node)
feeds ``unroll`` (the K FT steps), whose end point feeds the validation loss; one backward
gives the hypergradient. Nothing is implemented twice.

Example (a linear model; PT and FT share the weight vector):
    >>> import torch, hypergrad as hg
    >>> torch.set_default_dtype(torch.float64)
    >>> X = torch.randn(32, 3); y = X @ torch.tensor([1.0, -2.0, 0.5])
    >>> pt = lambda p, h: ((X @ p["w"] - y) ** 2).mean() + (h["l2"].exp() * p["w"] ** 2).sum()
    >>> ft = lambda e, hd: ((X @ e["w"] * hd["s"] - y) ** 2).mean()
    >>> w = torch.linalg.solve(2 * X.T @ X / 32 + 2 * torch.eye(3), 2 * X.T @ y / 32)  # PT optimum
    >>> res = hg.pretraining_hypergrad(pt, ft, ft, {"w": w}, {"s": torch.ones(())},
    ...                                {"l2": torch.zeros(3)}, ft_steps=1)
    >>> torch.set_default_dtype(torch.float32)
    >>> res.hypergrad["l2"].shape
    torch.Size([3])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from . import _checks, tree
from .implicit import PendingHealth, _implicit_solution_fast
from .solvers import SolveResult, neumann
from .tree import Tree
from .unroll import _unroll, gradient_step

__all__ = ["pretraining_hypergrad", "PretrainingHypergrad", "default_solver"]

default_solver = functools.partial(neumann, iterations=5, alpha="auto", power_iterations=10)


class PretrainingHypergrad(NamedTuple):
    """``hypergrad`` (like hparams), ``ft_head`` after the K FT steps (detached, to keep
    online), ``val_loss`` (0-dim), ``info`` (diagnostics of the IFT solve, see implicit_grad)."""

    hypergrad: Tree
    ft_head: Tree
    val_loss: torch.Tensor
    info: dict[str, Any]


def pretraining_hypergrad(
    pt_loss: Callable[[Tree, Tree], torch.Tensor],
    ft_loss: Callable[[Tree, Tree], torch.Tensor],
    val_loss: Callable[[Tree, Tree], torch.Tensor],
    pt_params: Tree,
    ft_head: Tree,
    hparams: Tree,
    *,
    encoder: Callable[[Tree], Tree] | None = None,
    ft_steps: int = 1,
    ft_lr: float = 1e-2,
    head_only: bool = True,
    solver: Callable[..., SolveResult] | None = None,
    on_failure: str = "ignore",
    stationarity_tol: float | None = None,
    products: str = "exact",
    fd_eps: float | None = None,
) -> PretrainingHypergrad:
    """One hypergradient of Algorithm 1 (Raghu et al. 2021).

    Args:
        pt_loss: ``L_PT(pt_params, hparams)`` on one fixed PT batch (all of its randomness fixed).
        ft_loss: ``L_FT(enc_params, ft_head)`` on the FT-train batch (the K unrolled steps).
        val_loss: ``L_FT(enc_params, ft_head)`` on the FT-val batch (the meta-objective).
        pt_params: the current PT solution theta_PT (encoder and PT head): the IFT is taken
            over all of it.
        ft_head: the FT head psi_FT.
        hparams: the meta-parameters phi. ``pt_params``, ``ft_head`` and ``hparams`` hold
            floating tensors of one dtype and device (nothing is cast).
        encoder: maps ``pt_params`` to the part the FT model uses (default: all of it).
        ft_steps: K, the number of differentiable FT steps (0 = no FT Jacobian).
        ft_lr: step size of the FT unroll (plain gradient descent).
        head_only: only the head moves in the unroll (the encoder output still depends on
            theta_PT, so the hypergradient flows through the features); else encoder and head.
        solver: inverse-Hessian solver for the IFT; default ``neumann(iterations=5,
            alpha="auto")``. The online loop uses the PT step size as ``alpha`` instead.
        on_failure: as in :func:`hypergrad.implicit_grad`. Online PT is never at a stationary
            point, so the default neither warns nor raises; read ``info`` instead.
        stationarity_tol: as in :func:`hypergrad.implicit_grad`; the default ``None`` skips
            the stationarity check (and its Hessian-vector product).
        products: ``"exact"`` (double backward) or ``"finite_difference"``: every second-order
            product, in the IFT solve and in the K-step FT unroll's backward, from central
            differences of first-order gradients (:class:`hypergrad.FiniteDifferenceOperator`),
            so Algorithm 1 runs on models with no double backward (fused attention kernels,
            compiled losses). The FT unroll then runs its adjoint recursion explicitly.
        fd_eps: the relative step of those finite differences (only with
            ``products="finite_difference"``), as in :func:`hypergrad.implicit_grad`.

    Inputs are validated here, once, under these names; the library calls inside trust them.
    One host read in all: the finiteness of the three trees is read together with the IFT
    backward's health check (``info["health"]`` holds the solve's numbers as Python floats),
    and a NaN/inf input raises the same ``ValueError`` naming it, before any other finding.
    """
    validate(pt_loss, ft_loss, val_loss, pt_params, ft_head, hparams, encoder=encoder,
             ft_steps=ft_steps, ft_lr=ft_lr, head_only=head_only, solver=solver,
             on_failure=on_failure, stationarity_tol=stationarity_tol, products=products,
             fd_eps=fd_eps, finite=False)
    trees = {"pt_params": pt_params, "ft_head": ft_head, "hparams": hparams}
    pending: list[PendingHealth] = []
    try:
        res = _pretraining_hypergrad(
            pt_loss, ft_loss, val_loss, pt_params, ft_head, hparams, encoder=encoder,
            ft_steps=ft_steps, ft_lr=float(ft_lr), head_only=head_only, solver=solver,
            on_failure=on_failure, stationarity_tol=stationarity_tol, products=products,
            fd_eps=fd_eps, pending=pending)
    except Exception as e:  # a NaN/inf input is the cause to report, if there is one
        health = _checks.Health()
        _add_entry_health(health, trees)
        health.read()
        _raise_entry_nonfinite(health, trees, e)
        raise
    health = pending[0].health if pending else _checks.Health()
    _add_entry_health(health, trees)
    health.read()  # the one host read of the call
    _raise_entry_nonfinite(health, trees)
    for p in pending:
        p.complete()
    return res


def _add_entry_health(health: _checks.Health, trees: dict[str, Tree]) -> None:
    for name, t in trees.items():
        health.add_finite("entry:" + name, tree.leaves(t))


def _raise_entry_nonfinite(health: _checks.Health, trees: dict[str, Tree],
                           cause: BaseException | None = None) -> None:
    """The entry's ``ValueError`` for the first input tree with a NaN/inf leaf, if any."""
    for name, t in trees.items():
        k = health.first_nonfinite("entry:" + name)
        if k is not None:
            raise ValueError(
                f"`{name}` leaf {_leaf_name(t, k)} (shape {tuple(tree.leaves(t)[k].shape)}) "
                "contains NaN or inf; a hypergradient at non-finite values is meaningless"
            ) from cause


def validate(
    pt_loss: Any, ft_loss: Any, val_loss: Any, pt_params: Any, ft_head: Any, hparams: Any, *,
    encoder: Any = None, ft_steps: Any = 1, ft_lr: Any = 1e-2, head_only: Any = True,
    solver: Any = None, on_failure: Any = "ignore", stationarity_tol: Any = None,
    products: Any = "exact", fd_eps: Any = None, finite: bool = True,
) -> None:
    """The checks of :func:`pretraining_hypergrad`'s entry (internal; also used by
    :class:`hypergrad.MetaPretrainer`), each naming the argument as the caller spelled it.
    ``finite=True`` adds one finiteness check of all three trees (one host read)."""
    for f, name in ((pt_loss, "pt_loss"), (ft_loss, "ft_loss"), (val_loss, "val_loss")):
        _checks.callable_(f, name)
    if encoder is not None:
        _checks.callable_(encoder, "encoder")
    if solver is not None:
        _checks.callable_(solver, "solver")
    _checks.nonneg_int(ft_steps, "ft_steps")
    _checks.positive_number(ft_lr, "ft_lr")
    if not isinstance(head_only, bool):
        raise TypeError(f"`head_only` must be True or False, got {head_only!r}")
    _checks.policy(on_failure)
    if stationarity_tol is not None:
        _checks.nonneg_number(stationarity_tol, "stationarity_tol")
    _checks.products(products, fd_eps)
    trees = {"pt_params": pt_params, "ft_head": ft_head, "hparams": hparams}
    flat = {name: _checks.tensor_tree(t, name) for name, t in trees.items()}
    ref = flat["pt_params"][0]
    for name, leaves in flat.items():
        for i, x in enumerate(leaves):
            if x.dtype != ref.dtype or x.device != ref.device:
                raise TypeError(
                    f"`{name}` leaf {_leaf_name(trees[name], i)} is {x.dtype} on {x.device} but "
                    f"`pt_params` leaf {_leaf_name(pt_params, 0)} is {ref.dtype} on {ref.device}; "
                    f"cast `{name}` (e.g. with .to({ref.dtype})): hypergrad never casts silently"
                )
    if finite:
        all_leaves = [x for leaves in flat.values() for x in leaves]
        ok = torch.stack([torch.isfinite(x.detach()).all() for x in all_leaves])
        if not bool(ok.all()):  # the one host read of the entry
            k = int((~ok).nonzero()[0, 0])
            for name, leaves in flat.items():
                if k < len(leaves):
                    raise ValueError(
                        f"`{name}` leaf {_leaf_name(trees[name], k)} (shape "
                        f"{tuple(leaves[k].shape)}) contains NaN or inf; a hypergradient at "
                        "non-finite values is meaningless"
                    )
                k -= len(leaves)


def _leaf_name(t: Tree, i: int) -> str:
    """``'w'`` for a dict key, else the leaf index."""
    if isinstance(t, dict) and all(not isinstance(v, (dict, list, tuple)) for v in t.values()):
        return repr(list(t)[i])
    return str(i)


def _named(loss: Callable[[Tree, Tree], torch.Tensor], name: str):
    """``loss`` whose value is checked to be a scalar under the caller's name (no host read)."""
    def checked(a: Tree, b: Tree) -> torch.Tensor:
        return _checks.scalar_loss(loss(a, b), name)

    return checked


def _pretraining_hypergrad(
    pt_loss: Callable[[Tree, Tree], torch.Tensor],
    ft_loss: Callable[[Tree, Tree], torch.Tensor],
    val_loss: Callable[[Tree, Tree], torch.Tensor],
    pt_params: Tree,
    ft_head: Tree,
    hparams: Tree,
    *,
    encoder: Callable[[Tree], Tree] | None,
    ft_steps: int,
    ft_lr: float,
    head_only: bool,
    solver: Callable[..., SolveResult] | None,
    on_failure: str,
    stationarity_tol: float | None,
    products: str = "exact",
    fd_eps: float | None = None,
    pending: list[PendingHealth] | None = None,
) -> PretrainingHypergrad:
    """:func:`pretraining_hypergrad` on inputs already validated: no checks, and no host read
    but the IFT backward's one health read; with a list as ``pending`` not even that: the
    backward's :class:`~hypergrad.implicit.PendingHealth` is appended there for the caller to
    read with its own signals and complete (``info`` is empty until then)."""
    h = tree.detach(hparams, requires_grad=True)
    info: dict[str, Any] = {}
    # theta_PT as a function of phi through the IFT (values unchanged, backward = Eq. 3).
    theta = _implicit_solution_fast(
        _named(pt_loss, "pt_loss"), tree.detach(pt_params), h, solver=solver or default_solver,
        on_failure=on_failure, stationarity_tol=stationarity_tol, info=info, products=products,
        fd_eps=fd_eps, pending=pending,
    )
    enc = encoder(theta) if encoder is not None else theta
    head0 = tree.detach(ft_head)
    ft = _named(ft_loss, "ft_loss")
    if products == "finite_difference":
        enc_k, head_k = _first_order_unroll(ft, enc, head0, ft_steps, ft_lr, head_only, fd_eps)
    elif head_only:
        # theta_FT(k+1) = theta_FT(k) for the encoder; psi(k+1) = psi(k) - lr dL_FT/dpsi.
        # The encoder enters the step as a constant of the unroll ("hparams" of the step).
        step = gradient_step(lambda head, e: ft(e, head), ft_lr)
        head_k = _unroll(step, head0, enc, ft_steps, check_finite=False)  # checked at the end
        enc_k = enc
    else:
        step = gradient_step(lambda s, _: ft(s[0], s[1]), ft_lr)
        enc_k, head_k = _unroll(step, (enc, head0), (), ft_steps, check_finite=False)
    with torch.enable_grad():
        val = _checks.scalar_loss(val_loss(enc_k, head_k), "val_loss")
        h_flat = tree.leaves(h)
        grads = (
            torch.autograd.grad(val, h_flat, allow_unused=True)
            if val.requires_grad
            else [None] * len(h_flat)
        )
    hyper = tree.unflatten(
        [torch.zeros_like(x) if g is None else g for x, g in zip(h_flat, grads)],
        tree.flatten(h)[1],
    )
    return PretrainingHypergrad(hyper, tree.detach(head_k), val.detach(), info)


class _FirstOrderUnroll(torch.autograd.Function):
    """The K plain-GD FT steps of :func:`pretraining_hypergrad` whose backward takes no double
    backward: the adjoint recursion of the unroll with finite-difference products
    (:class:`hypergrad.FiniteDifferenceOperator`). Head only, with ``u = dL/dpsi_K``:

        for k = K-1 .. 0:  g_enc -= lr u^T d2 L_FT / d psi d enc (psi_k);
                           u <- u - lr d2 L_FT / d psi2 (psi_k) u,

    and ``u`` is then dL/dpsi_0; encoder and head together, the state s = (enc, psi) and
    ``u <- u - lr d2 L_FT / ds2 (s_k) u``. Each product is two first-order gradients."""

    @staticmethod
    def forward(ctx, cfg: dict[str, Any], *tensors: torch.Tensor):  # type: ignore[override]
        n, ft, lr = cfg["n_enc"], cfg["ft"], cfg["lr"]
        enc = tree.unflatten([t.detach() for t in tensors[:n]], cfg["enc_spec"])
        head = [t.detach() for t in tensors[n:]]
        states = []
        if cfg["head_only"]:
            for _ in range(cfg["steps"]):
                states.append(head)
                head = _gd_step(lambda h: ft(enc, tree.unflatten(h, cfg["head_spec"])), head, lr)
            out = head
        else:
            s = tree.leaves(enc) + head
            split = functools.partial(_split, cfg)
            for _ in range(cfg["steps"]):
                states.append(s)
                s = _gd_step(lambda x: ft(*split(x)), s, lr)
            out = s
        ctx.cfg, ctx.states, ctx.enc = cfg, states, enc
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        from .finite_difference import FiniteDifferenceOperator

        cfg, ft, lr, n = ctx.cfg, ctx.cfg["ft"], ctx.cfg["lr"], ctx.cfg["n_enc"]
        u = list(grads)
        if cfg["head_only"]:
            g_enc = [torch.zeros_like(x) for x in tree.leaves(ctx.enc)]
            for head in reversed(ctx.states):
                op = FiniteDifferenceOperator._internal(  # inputs checked at the entry
                    lambda h, e: ft(e, h), tree.unflatten(head, cfg["head_spec"]), ctx.enc, (),
                    name="ft_loss", eps=cfg["eps"])
                u_tree = tree.unflatten(u, cfg["head_spec"])
                g_enc = [g - lr * m for g, m in zip(g_enc, tree.leaves(op.mixed_vjp(u_tree)))]
                u = [a - lr * b for a, b in zip(u, tree.leaves(op(u_tree)))]
            return (None, *g_enc, *u)
        for s in reversed(ctx.states):
            op = FiniteDifferenceOperator._internal(lambda x: ft(*_split(cfg, x)), s, None, (),
                                                    name="ft_loss", eps=cfg["eps"])
            u = [a - lr * b for a, b in zip(u, op(u))]
        return (None, *u[:n], *u[n:])


def _split(cfg: dict[str, Any], leaves: list[torch.Tensor]) -> tuple[Tree, Tree]:
    n = cfg["n_enc"]
    return (tree.unflatten(leaves[:n], cfg["enc_spec"]),
            tree.unflatten(leaves[n:], cfg["head_spec"]))


def _gd_step(loss: Callable[[list[torch.Tensor]], torch.Tensor], x: list[torch.Tensor],
             lr: float) -> list[torch.Tensor]:
    """``x - lr d loss / dx`` with a first-order gradient (no graph kept)."""
    with torch.enable_grad():
        xs = [t.detach().requires_grad_(True) for t in x]
        value = loss(xs)
        gs = (torch.autograd.grad(value, xs, allow_unused=True) if value.requires_grad
              else [None] * len(xs))
    return [(t - lr * g if g is not None else t).detach() for t, g in zip(xs, gs)]


def _first_order_unroll(ft: Callable[[Tree, Tree], torch.Tensor], enc: Tree, head: Tree,
                        steps: int, lr: float, head_only: bool, eps: float | None = None
                        ) -> tuple[Tree, Tree]:
    """(encoder, head) after ``steps`` FT steps, differentiable in ``enc`` and ``head`` with
    first-order gradients only (see :class:`_FirstOrderUnroll`)."""
    if steps == 0:
        return enc, head
    e_flat, e_spec = tree.flatten(enc)
    h_flat, h_spec = tree.flatten(head)
    cfg = {"ft": ft, "lr": lr, "steps": steps, "head_only": head_only, "n_enc": len(e_flat),
           "enc_spec": e_spec, "head_spec": h_spec, "eps": eps}
    out = list(_FirstOrderUnroll.apply(cfg, *e_flat, *h_flat))
    if head_only:
        return enc, tree.unflatten(out, h_spec)
    return tree.unflatten(out[: len(e_flat)], e_spec), tree.unflatten(out[len(e_flat):], h_spec)
