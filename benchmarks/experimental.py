"""A candidate CG for the library, measured side by side with ``hg.cg`` (not part of hypergrad).

``flat_cg`` is ``hg.cg``'s algorithm (same recurrences, same stopping rule, same
``SolveResult``, non-positive-curvature stop, Rayleigh-quotient stats) run on ONE flat vector:
the right-hand side is concatenated once, every vector operation of the loop is a single
tensor op, and the matvec sees views of that vector unflattened into the pytree (no copies in)
and its output is concatenated back (one copy of n numbers out). ``hg.cg`` runs every vector
operation leaf by leaf through ``hypergrad.tree``, re-flattening and re-checking the pytree
structure in every operation: about 20 dispatcher calls per leaf and iteration. It also
allows ``dot_dtype=torch.float64``: inner products of float32 vectors accumulated in float64.
"""

from __future__ import annotations

import torch

import hypergrad as hg
from hypergrad import tree


def flat_cg(matvec, b, *, maxiter: int = 100, tol: float = 1e-6, damping: float = 0.0,
            dot_dtype: torch.dtype | None = None) -> hg.SolveResult:
    leaves, spec = tree.flatten(b)
    shapes = [x.shape for x in leaves]
    sizes = [x.numel() for x in leaves]
    bf = torch.cat([x.reshape(-1) for x in leaves])

    def unflat(v: torch.Tensor):
        return tree.unflatten([c.view(s) for c, s in zip(torch.split(v, sizes), shapes)], spec)

    def A(v: torch.Tensor) -> torch.Tensor:
        out = torch.cat([y.reshape(-1) for y in tree.leaves(matvec(unflat(v)))])
        return out.add_(v, alpha=damping) if damping else out

    def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if dot_dtype is not None and u.dtype != dot_dtype:
            return torch.dot(u.to(dot_dtype), v.to(dot_dtype))
        return torch.dot(u, v)

    b_norm = torch.sqrt(dot(bf, bf))
    x = torch.zeros_like(bf)
    if float(b_norm) == 0.0:
        return hg.SolveResult(unflat(x), torch.tensor(0), b_norm, torch.tensor(True),
                              {"nonpositive_curvature": torch.tensor(False)})
    r, p = bf.clone(), bf.clone()
    rs = dot(r, r)
    threshold = (tol * b_norm) ** 2
    nonpositive = torch.tensor(False)
    lo = torch.tensor(float("inf"), dtype=b_norm.dtype)
    hi = torch.tensor(0.0, dtype=b_norm.dtype)
    iters = 0
    for _ in range(maxiter):
        if bool(rs <= threshold):
            break
        ap = A(p)
        iters += 1
        pap = dot(p, ap)
        rayleigh = pap / dot(p, p)
        lo, hi = torch.minimum(lo, rayleigh), torch.maximum(hi, rayleigh)
        if not bool(pap > 0) or not bool(torch.isfinite(pap)):
            nonpositive = torch.tensor(True)
            break
        step = (rs / pap).to(bf.dtype)
        x.add_(p * step)
        r.sub_(ap * step)
        rs_new = dot(r, r)
        p.mul_((rs_new / rs).to(bf.dtype)).add_(r)
        rs = rs_new
    residual = torch.sqrt(rs) / b_norm
    return hg.SolveResult(unflat(x), torch.tensor(iters), residual, residual <= tol,
                          {"nonpositive_curvature": nonpositive, "min_rayleigh": lo,
                           "max_rayleigh": hi})
