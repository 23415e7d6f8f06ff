"""The measured computations, as zero-argument callables built from a :class:`BenchProblem`.

Everything a benchmark times is built here once, so the pytest-benchmark files, the report and
the memory subprocesses time exactly the same code.

Products (per call):
    ``grad``             one gradient of the inner loss w.r.t. params (THE UNIT of every ratio)
    ``hvp``              ``hg.hvp``: builds the first-order graph, then one product
    ``matvec``           ``hg.make_hvp`` built once, then ``op(v)``: one extra backward
    ``mixed_vjp``        ``hg.mixed_vjp``: graph + one backward into hparams
    ``op_mixed``         ``op.mixed_vjp(v)`` on a prebuilt operator (what implicit_grad pays)
    ``func_vjp_matvec``  ``torch.func.vjp`` of ``torch.func.grad``, the vjp_fn reused (torchopt's
                         product inside ``custom_root``)
    ``fwd_over_rev``     ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse)

Hypergradients (each returns a dict like ``hparams``; all compute the full
``dL/dhparams = dL/dhparams|direct - (d2f/dhparams dparams) H^{-1} dL/dparams``):
    ``hg_implicit(P, "cg"|"neumann", J)``  ``hg.implicit_grad``, ``stationarity_tol=None``,
        ``on_failure="ignore"``; CG with ``maxiter=J, tol=0`` (exactly J matvecs), Neumann with
        ``iterations=J`` and a fixed ``alpha`` (J matvecs, J terms of the series).
    ``torchopt_implicit(P, "cg"|"neumann", J)``  ``torchopt.diff.implicit.custom_root`` with
        optimality function ``torch.func.grad(inner_loss)`` (torchopt's documented pattern) and
        ``solve_cg(maxiter=J, rtol=0, atol=0)`` (J iterations, J + 1 matvecs: torchopt's CG
        forms ``b - A x0`` even for ``x0 = 0``) or ``solve_inv(ns=True, maxiter=J, alpha)``
        (J matvecs, J + 1 terms); the "solver" returns the stored optimum and the outer loss is
        back-propagated through it, which is how custom_root yields a hypergradient.
    ``hg_unroll`` / ``higher_unroll`` / ``torchopt_unroll``: ``T`` SGD steps from ``P.init``
        of which the last ``K`` are recorded, then ``dL(params_T)/dhparams``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import hypergrad as hg

from .problems import BenchProblem

# ---------------------------------------------------------------------------------- products


def grad(P: BenchProblem):
    p = P.fresh_params(True)
    leaves = list(p.values())
    h = P.fresh_hparams()

    def run():
        return torch.autograd.grad(P.inner_loss(p, h), leaves)

    return run


def hvp(P: BenchProblem):
    v = P.direction()
    return lambda: hg.hvp(P.inner_loss, P.params, v, P.hparams)


def matvec(P: BenchProblem):
    op = hg.make_hvp(P.inner_loss, P.params, P.hparams)
    v = P.direction()
    return lambda: op(v)


def mixed_vjp(P: BenchProblem):
    v = P.direction()
    return lambda: hg.mixed_vjp(P.inner_loss, P.params, P.hparams, v)


def op_mixed(P: BenchProblem):
    op = hg.HessianOperator(P.inner_loss, P.params, P.hparams, ())
    v = P.direction()
    return lambda: op.mixed_vjp(v)


def func_vjp_matvec(P: BenchProblem):
    h = P.fresh_hparams()
    _, vjp_fn = torch.func.vjp(lambda p: torch.func.grad(P.inner_loss)(p, h), P.params)
    v = P.direction()
    return lambda: vjp_fn(v)


def fwd_over_rev(P: BenchProblem):
    h = P.fresh_hparams()
    v = P.direction()
    g = torch.func.grad(P.inner_loss)
    return lambda: torch.func.jvp(lambda p: g(p, h), (P.params,), (v,))[1]


PRODUCTS = {
    "grad": grad, "hvp": hvp, "matvec": matvec, "mixed_vjp": mixed_vjp, "op_mixed": op_mixed,
    "func_vjp_matvec": func_vjp_matvec, "fwd_over_rev": fwd_over_rev,
}

# ------------------------------------------------------------------------- implicit (IFT)


def neumann_alpha(P: BenchProblem) -> float:
    """A fixed Neumann step ``1 / (1.1 lambda_max)`` (30 power iterations, computed once per
    problem and shared by both libraries, so neither pays for it in the timings)."""
    if "_alpha" not in P.__dict__:
        op = hg.make_hvp(P.inner_loss, P.params, P.hparams)
        lam, _ = hg.power_iteration(op, P.direction(seed=2), iterations=30)
        P.__dict__["_alpha"] = 1.0 / (1.1 * float(lam))  # safely inside (0, 2 / lambda_max)
    return P.__dict__["_alpha"]


def hg_solver(kind: str, J: int, alpha: float | None = None):
    if kind == "cg":
        return functools.partial(hg.cg, maxiter=J, tol=0.0)
    if kind == "neumann":
        return functools.partial(hg.neumann, iterations=J, alpha=alpha)
    raise ValueError(kind)


def torchopt_solver(kind: str, J: int, alpha: float | None = None):
    import torchopt

    if kind == "cg":
        return torchopt.linear_solve.solve_cg(maxiter=J, rtol=0.0, atol=0.0)
    if kind == "normal_cg":  # custom_root's default solver
        return torchopt.linear_solve.solve_normal_cg(maxiter=J, rtol=0.0, atol=0.0)
    if kind == "neumann":
        return torchopt.linear_solve.solve_inv(ns=True, maxiter=J, alpha=alpha)
    raise ValueError(kind)


def hg_implicit(P: BenchProblem, kind: str, J: int, *, solver=None):
    alpha = neumann_alpha(P) if kind == "neumann" else None
    solver = solver or hg_solver(kind, J, alpha)

    def run():
        return hg.implicit_grad(P.inner_loss, P.outer_loss, P.params, P.hparams, solver=solver,
                                stationarity_tol=None, on_failure="ignore")

    return run


def implicit_parts(P: BenchProblem) -> dict:
    """The pieces ``implicit_grad`` is made of, to time separately: the first-order graph, one
    matvec, one mixed product on the built operator, the outer gradient (and the unit)."""
    op = hg.HessianOperator(P.inner_loss, P.params, P.hparams, ())
    v = P.direction()
    p, h = P.fresh_params(True), P.fresh_hparams(True)
    leaves = list(p.values()) + list(h.values())
    return {
        "grad": grad(P),
        "graph": lambda: hg.HessianOperator(P.inner_loss, P.params, P.hparams, ()),
        "matvec": lambda: op(v),
        "mixed": lambda: op.mixed_vjp(v),
        "outer": lambda: torch.autograd.grad(P.outer_loss(p, h), leaves, allow_unused=True),
    }


def torchopt_implicit(P: BenchProblem, kind: str, J: int, *, solve=None):
    from torchopt.diff.implicit import custom_root

    alpha = neumann_alpha(P) if kind == "neumann" else None
    solve = solve or torchopt_solver(kind, J, alpha)
    names, hnames = list(P.params), list(P.hparams)
    sol = tuple(P.params.values())

    def f(p: tuple, h: tuple) -> torch.Tensor:
        return P.inner_loss(dict(zip(names, p)), dict(zip(hnames, h)))

    optimality = torch.func.grad(f, argnums=0)  # (p, h) -> d f / d p

    @custom_root(optimality, argnums=1, solve=solve)
    def solver_fn(p: tuple, h: tuple) -> tuple:
        return sol  # the inner optimum, found beforehand (as for hg.implicit_grad)

    def run():
        h = tuple(x.detach().requires_grad_(True) for x in P.hparams.values())
        p_star = solver_fn(sol, h)
        L = P.outer_loss(dict(zip(names, p_star)), dict(zip(hnames, h)))
        return dict(zip(hnames, torch.autograd.grad(L, h)))

    return run


# ---------------------------------------------------------------------------------- unroll


def _leaves_after_free_steps(P: BenchProblem, steps: int, lr: float) -> list[torch.Tensor]:
    """Plain SGD without any graph (the untracked part of a truncated unroll)."""
    names = list(P.init)
    p = [x.detach() for x in P.init.values()]
    h = P.fresh_hparams()
    for _ in range(steps):
        q = [x.requires_grad_(True) for x in p]
        g = torch.autograd.grad(P.inner_loss(dict(zip(names, q)), h), q)
        p = [(x - lr * gi).detach() for x, gi in zip(q, g)]
    return p


def hg_unroll(P: BenchProblem, T: int, K: int | None = None, *, lr: float = 1.0,
              checkpoint_every: int | None = None):
    step = hg.gradient_step(P.inner_loss, lr)

    def run():
        h = P.fresh_hparams(True)
        p_T = hg.unroll(step, P.init, h, T, truncate=K, checkpoint_every=checkpoint_every)
        L = P.outer_loss(p_T, h)
        return dict(zip(h, torch.autograd.grad(L, list(h.values()))))

    return run


def higher_unroll(P: BenchProblem, T: int, K: int | None = None, *, lr: float = 1.0):
    import higher

    K = T if K is None else K
    module = P.model
    opt = torch.optim.SGD(module.parameters(), lr=lr)

    def run():
        h = P.fresh_hparams(True)
        with torch.no_grad():  # reset the module to the initialisation
            for x, x0 in zip(module.parameters(), P.init.values()):
                x.copy_(x0)
        hd = {k: v.detach() for k, v in h.items()}
        for _ in range(T - K):  # untracked steps: ordinary PyTorch training
            opt.zero_grad()
            out = module(P.data["x_tr"])
            P.train_objective(out, list(module.parameters()), hd).backward()
            opt.step()
        with higher.innerloop_ctx(module, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for _ in range(K):
                out = fmodel(P.data["x_tr"])
                diffopt.step(P.train_objective(out, list(fmodel.parameters()), h))
            L = F.cross_entropy(fmodel(P.data["x_va"]), P.data["y_va"])
            return dict(zip(h, torch.autograd.grad(L, list(h.values()))))

    return run


def torchopt_unroll(P: BenchProblem, T: int, K: int | None = None, *, lr: float = 1.0):
    import torchopt

    K = T if K is None else K
    names = list(P.init)
    opt = torchopt.sgd(lr=lr)

    def run():
        h = P.fresh_hparams(True)
        hd = {k: v.detach() for k, v in h.items()}
        p = tuple(x.detach() for x in P.init.values())
        state = opt.init(p)
        for t in range(T):
            tracked = t >= T - K
            fresh = not (tracked and p[0].requires_grad)
            q = tuple(x.detach().requires_grad_(True) for x in p) if fresh else p
            loss = P.inner_loss(dict(zip(names, q)), h if tracked else hd)
            g = torch.autograd.grad(loss, q, create_graph=tracked)
            updates, state = opt.update(g, state, params=q, inplace=False)
            p = torchopt.apply_updates(q, updates, inplace=False)
            if not tracked:
                p = tuple(x.detach() for x in p)
        L = P.outer_loss(dict(zip(names, p)), h)
        return dict(zip(h, torch.autograd.grad(L, list(h.values()))))

    return run


UNROLLS = {"hypergrad": hg_unroll, "higher": higher_unroll, "torchopt": torchopt_unroll}


def rel_error(a: dict, b: dict) -> float:
    """``||a - b|| / ||b||`` over all leaves (float64)."""
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    den = sum(float((b[k].double() ** 2).sum()) for k in b)
    return (num / den) ** 0.5 if den > 0 else num**0.5
