"""Optional cross-check with jaxopt (implicit_diff), run in a SEPARATE environment.

jaxopt is never a dependency of this project. Two steps:

1. In the project's environment, export the problems (data, h, theta* and the dense float64
   hypergradient of ``benchmarks.bilevel.metrics``) to ``.npz`` files::

       python -m benchmarks.bilevel.jaxopt_check --export /tmp/bilevel_npz [--size tiny]

2. In a virtual environment with jax and jaxopt only (no torch, no hypergrad)::

       python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax jaxopt numpy scikit-learn
       /tmp/jaxenv/bin/python benchmarks/bilevel/jaxopt_check.py /tmp/bilevel_npz

   which rewrites each loss in jax.numpy (float64), solves the inner problem with
   ``jaxopt.LBFGS(implicit_diff=True)`` and differentiates the outer loss through it with
   ``jax.grad`` (jaxopt's implicit differentiation, its CG to 1e-12), and prints/writes
   (``jaxopt_check.json`` in the same folder) the relative difference to the exported
   reference.

This file imports neither torch nor the project at module level, so step 2 runs without them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def export(out: Path, size: str = "tiny") -> None:
    """Step 1 (project environment): one ``<problem>.npz`` per problem."""
    import torch

    from benchmarks.bilevel import metrics as M
    from benchmarks.bilevel.problems import PROBLEMS, make_problem

    out.mkdir(parents=True, exist_ok=True)
    for name in PROBLEMS:
        P = make_problem(name, size=size, dtype=torch.float64)
        arrays = {k: v.cpu().numpy() for k, v in P.tensors.items()}
        theta, g = M.hypergradient(P, P.h0)
        np.savez(
            out / f"{name}.npz",
            kind=P.kind,
            h=P.h0.numpy(),
            theta_star=theta.numpy(),
            reference=g.numpy(),
            reg=P.info.get("reg", 0.0),
            **arrays,
        )
        print(f"exported {name} ({P.kind}) to {out / (name + '.npz')}")


def _losses(d: dict):  # pragma: no cover - runs in the jax environment
    import jax
    import jax.numpy as jnp

    kind = str(d["kind"])

    def quad(prefix):
        a, w, c, b, l, m = (jnp.asarray(d[f"data_{prefix}_{k}"]) for k in "awcblm")

        def f(z, x):
            az, wx = a @ z, w @ x
            return jnp.mean(0.5 * az * az + 0.5 * wx * wx + (c @ x) * (b @ z) + l @ z + m @ x)

        return f

    if kind == "quadratic":
        return quad("in"), quad("out")
    Xtr, ytr = jnp.asarray(d["X_train"]), jnp.asarray(d["y_train"])
    Xva, yva = jnp.asarray(d["X_val"]), jnp.asarray(d["y_val"])
    if kind == "binary":

        def inner(t, h):
            return jnp.mean(jax.nn.softplus(-ytr * (Xtr @ t))) + 0.5 * jnp.sum(jnp.exp(h) * t * t)

        def outer(t, h):
            return jnp.mean(jax.nn.softplus(-yva * (Xva @ t)))

        return inner, outer
    nf = Xtr.shape[1]

    def ce(t, X, y):
        logits = X @ t.reshape(nf, -1)
        return jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]

    def outer(t, h):
        return jnp.mean(ce(t, Xva, yva))

    if kind == "multiclass":

        def inner(t, h):
            sq = jnp.sum(t.reshape(nf, -1) ** 2, axis=0)
            return jnp.mean(ce(t, Xtr, ytr)) + 0.5 * jnp.sum(jnp.exp(h) * sq)

        return inner, outer
    reg = float(d["reg"])

    def inner(t, h):
        return jnp.mean(jax.nn.sigmoid(h) * ce(t, Xtr, ytr)) + reg * jnp.sum(t * t)

    return inner, outer


def check(folder: Path) -> dict:  # pragma: no cover - runs in the jax environment
    """Step 2 (jax environment)."""
    import functools
    import importlib.metadata

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import jaxopt

    results = {
        "jax": jax.__version__,
        "jaxopt": importlib.metadata.version("jaxopt"),
        "problems": {},
    }
    for path in sorted(folder.glob("*.npz")):
        d = dict(np.load(path))
        inner, outer = _losses(d)
        solve = functools.partial(jaxopt.linear_solve.solve_cg, tol=1e-12, maxiter=20000)
        solver = jaxopt.LBFGS(
            fun=inner, tol=1e-12, maxiter=2000, implicit_diff=True, implicit_diff_solve=solve
        )
        theta0 = jnp.asarray(d["theta_star"])

        def value(h, solver=solver, theta0=theta0, outer=outer):
            return outer(solver.run(theta0, h).params, h)

        g = np.asarray(jax.grad(value)(jnp.asarray(d["h"])))
        ref = d["reference"]
        rel = float(np.linalg.norm(g - ref) / max(np.linalg.norm(ref), 1e-300))
        results["problems"][path.stem] = {
            "relative_difference": rel,
            "ref_norm": float(np.linalg.norm(ref)),
        }
        print(f"{path.stem}: jaxopt vs dense float64 reference, relative difference {rel:.2e}")
    (folder / "jaxopt_check.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--export":
        size = args[args.index("--size") + 1] if "--size" in args else "tiny"
        export(Path(args[1]), size)
    elif len(args) == 1:
        check(Path(args[0]))
    else:
        sys.exit(__doc__)
