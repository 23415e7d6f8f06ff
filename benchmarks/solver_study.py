"""Hypergradient error vs number of Hessian-vector products, per solver, on an ill-conditioned
problem (the comparison Hataya & Yamada 2023 draw), and vmap vs a Python loop.

``python -m benchmarks.solver_study [--out DIR]`` prints markdown tables and writes
``solver_study.json`` and ``solver_study.png`` in ``DIR`` (default benchmarks/out).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

import hypergrad as hg
from hypergrad import testing

BUDGETS = (5, 10, 20, 50, 100, 200)


def problem(n: int = 200, cond: float = 1e4, seed: int = 0, spectrum: str = "logspaced"):
    """A quadratic bi-level problem with condition number ``cond`` (closed-form answer).

    ``spectrum="logspaced"``: eigenvalues log-spaced over [1, cond] (hard for low-rank methods);
    ``"decaying"``: 10 eigenvalues log-spaced over [10, cond] and a flat tail at 1, the shape
    of neural-network Hessians (a few outliers, a bulk) that Nystrom is designed for.
    """
    prob = testing.quadratic_problem(seed=seed, n_params=n, n_hparams=10, cond=cond)
    if spectrum == "logspaced":
        return prob
    A_old, B = prob.extras["A"], prob.extras["B"]
    q = torch.linalg.eigh(A_old).eigenvectors
    eig = torch.ones(n, dtype=A_old.dtype)
    eig[-10:] = torch.logspace(1, float(torch.log10(torch.tensor(cond))), 10, dtype=A_old.dtype)
    A = (q * eig) @ q.T
    h = prob.hparams["h"]
    c = A_old @ prob.params["x"] - B @ h  # the original linear term
    t = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=A.dtype)

    def inner(p, hp):
        return 0.5 * p["x"] @ A @ p["x"] - p["x"] @ (B @ hp["h"] + c)

    def outer(p, hp):
        return 0.5 * ((p["x"] - t) ** 2).sum()

    p_star = torch.linalg.solve(A, B @ h + c)
    grad = B.T @ torch.linalg.solve(A, p_star - t)  # dL/dh, exact
    return testing.Problem(inner, outer, {"x": p_star}, {"h": h}, {"h": grad}, {"A": A, "B": B})


def _solvers(budget: int, lam_max: float) -> dict[str, object]:
    return {
        "cg": functools.partial(hg.cg, maxiter=budget, tol=0.0),
        "neumann": functools.partial(hg.neumann, iterations=budget, alpha=1.0 / lam_max, tol=0.0),
        "minres": functools.partial(hg.minres, maxiter=budget, tol=0.0),
        "gmres": functools.partial(hg.gmres, maxiter=budget, restart=budget, tol=0.0),
        # rho of the order of the smallest eigenvalue (1 here): the sketch captures the top of
        # the spectrum, rho stands in for the rest (Hataya & Yamada 2023)
        "nystrom": functools.partial(hg.nystrom, rank=max(budget - 1, 1), rho=1.0,
                                     sketch="gaussian"),
    }


def error_vs_cost(prob: testing.Problem) -> dict[str, list[tuple[int, float]]]:
    lam_max = float(torch.linalg.eigvalsh(prob.extras["A"]).max())
    rows: dict[str, list[tuple[int, float]]] = {}
    for budget in BUDGETS:
        for name, solver in _solvers(budget, lam_max).items():
            g, info = hg.implicit_grad(prob.inner_loss, prob.outer_loss, prob.params,
                                       prob.hparams, solver=solver, return_info=True,
                                       on_failure="ignore", stationarity_tol=None)
            matvecs = int(info["solve"].iterations)
            err = testing.compare(g, prob.hypergrad).rel_error
            rows.setdefault(name, []).append((matvecs, err))
    return rows


def vmap_vs_loop(settings: int = 8, n: int = 50, repeats: int = 5) -> dict[str, float]:
    prob = testing.ridge_problem(seed=1, n_features=n, n_train=200)
    X, y = prob.extras["X"], prob.extras["y"]
    hs = torch.randn(settings, n, generator=torch.Generator().manual_seed(0),
                     dtype=torch.float64) - 1.0
    ws = torch.stack([torch.linalg.solve(X.T @ X / len(X) + torch.diag(h.exp()),
                                         X.T @ y / len(X)) for h in hs])

    def one(w, h):
        return hg.functional_implicit_grad(prob.inner_loss, prob.outer_loss, w, h,
                                           iterations=20, tol=0.0)

    batched = torch.func.vmap(one)

    def loop():
        return torch.stack([one(w, h) for w, h in zip(ws, hs)])

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_vmap, t_loop = best(lambda: batched(ws, hs)), best(loop)
    err = testing.compare(batched(ws, hs), loop()).rel_error
    return {"settings": settings, "vmap_s": t_vmap, "loop_s": t_loop,
            "speedup": t_loop / t_vmap, "rel_err": err}


def markdown(rows: dict[str, list[tuple[int, float]]], n: int, cond: float, label: str) -> str:
    names = list(rows)
    head = "| budget (HVPs) | " + " | ".join(names) + " |"
    lines = [f"Hypergradient relative error vs Hessian-vector products (quadratic, n={n}, "
             f"condition number {cond:.0e}, {label}, float64; matvecs spent in parentheses)",
             "", head, "|" + "---|" * (len(names) + 1)]
    for i, budget in enumerate(BUDGETS):
        cells = [f"{rows[k][i][1]:.2e} ({rows[k][i][0]})" for k in names]
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(panels: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True)
    for ax, (title, rows) in zip(axes, panels.items()):
        for name, pts in rows.items():
            ax.loglog([p[0] for p in pts], [max(p[1], 1e-17) for p in pts], marker="o",
                      label=name)
        ax.set_xlabel("Hessian-vector products")
        ax.set_title(f"cond 1e4, {title} spectrum")
        ax.legend()
    axes[0].set_ylabel("relative error of the hypergradient")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--cond", type=float, default=1e4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: multi-threaded BLAS on a busy 2-core machine can be "
                    "1000x slower on small matrices)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = error_vs_cost(problem(args.n, args.cond))
    rows_dec = error_vs_cost(problem(args.n, args.cond, spectrum="decaying"))
    vm = vmap_vs_loop()
    text = markdown(rows, args.n, args.cond, "log-spaced spectrum")
    text += "\n\n" + markdown(rows_dec, args.n, args.cond,
                               "10 outlier eigenvalues over a flat bulk at 1")
    text += (f"\n\nvmap of functional_implicit_grad over {vm['settings']} hyperparameter settings:"
             f" {vm['vmap_s'] * 1e3:.1f} ms vs {vm['loop_s'] * 1e3:.1f} ms for the Python loop "
             f"({vm['speedup']:.1f}x faster), rel. difference {vm['rel_err']:.1e}")
    print(text)
    (out / "solver_study.json").write_text(json.dumps(
        {"error_vs_cost_logspaced": rows, "error_vs_cost_decaying": rows_dec, "vmap": vm},
        indent=2))
    plot({"log-spaced": rows, "outliers+bulk": rows_dec}, out / "solver_study.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
