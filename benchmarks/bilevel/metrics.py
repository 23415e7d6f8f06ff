"""BenchOpt's metrics, computed exactly in float64 and never from the code under test.

At the current outer variable ``h`` (cast to float64):
  theta*(h)  the inner solution: a dense linear solve (quadratic), else Newton's method on
             the full-batch inner loss with the dense Hessian in closed form
             (warm-started from the previous call, run to ||grad|| <= 1e-11);
  grad h     dL/dh - d2f/(dh dtheta) H^{-1} dL/dtheta at theta*, with H^{-1} by
             ``torch.linalg.solve`` and the products by plain autograd;
  value      ||grad h||^2 (BenchOpt's ``value``), ``func`` = L(theta*(h), h),
  inner_distance ||theta* - theta||^2 at the method's own theta,
  test_error the method's theta on the test split (classification problems),
  auroc      clean/corrupted separation by the weights sigmoid(h) (data cleaning).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .problems import Problem


def _quadratic_exact(P: Problem, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = P.tensors  # float64 means of the inner (in_) and outer (out_) sample matrices
    z = torch.linalg.solve(t["in_Hzz"], -t["in_l"] - t["in_C"].T @ h)
    grad_in = t["out_Hzz"] @ z + t["out_C"].T @ h + t["out_l"]
    grad_out = t["out_Hxx"] @ h + t["out_C"] @ z + t["out_m"]
    v = -torch.linalg.solve(t["in_Hzz"], grad_in)
    return z, grad_out + t["in_C"] @ v


def dense_hessian(P: Problem, theta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The inner Hessian d2f/dtheta2 in closed form (logistic losses; checked against
    ``torch.func.hessian`` in tests/test_bilevel_bench.py)."""
    X, n = P.tensors["X_train"], P.tensors["X_train"].shape[0]
    if P.kind == "binary":
        s = torch.sigmoid(P.tensors["y_train"] * (X @ theta))
        return (X.T * (s * (1 - s))) @ X / n + torch.diag(torch.exp(h))
    d = X.shape[1]
    p = torch.softmax(X @ theta.view(d, -1), dim=1)
    k = p.shape[1]
    c = torch.sigmoid(h) if P.kind == "cleaning" else torch.ones_like(p[:, 0])
    B = (X[:, :, None] * p[:, None, :]).reshape(n, d * k)  # B[i, (j, a)] = x_ij p_ia
    H = -(B.T * (c / n)) @ B  # - sum_i c_i x_ij x_il p_ia p_ib / n
    H = H.view(d, k, d, k)
    for a in range(k):  # + delta_ab sum_i c_i x_ij x_il p_ia / n
        H[:, a, :, a] += (X.T * (c * p[:, a] / n)) @ X
    H = H.reshape(d * k, d * k)
    if P.kind == "cleaning":
        reg = torch.full((d * k,), 2 * P.info["reg"], dtype=H.dtype, device=H.device)
    else:
        reg = torch.exp(h).repeat(d)  # theta.view(d, k): class a of row j is entry j * k + a
    return H + torch.diag(reg)


def _factor(H: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Cholesky factor of ``H``, or ``(H, False)`` when ``H`` is not numerically positive
    definite (a regularisation driven to ``exp(h) = 0`` on separable data): then ``_solve``
    uses the pseudo-inverse and the metrics say what that gives (possibly inf)."""
    L, info = torch.linalg.cholesky_ex(H)
    return (L, True) if int(info) == 0 else (H, False)


def _solve(factor: tuple[torch.Tensor, bool], b: torch.Tensor) -> torch.Tensor:
    F, ok = factor
    if ok:
        return torch.cholesky_solve(b[:, None], F)[:, 0]
    return torch.linalg.lstsq(F, b[:, None], driver="gelsd").solution[:, 0]


def newton(
    P: Problem, h: torch.Tensor, theta: torch.Tensor, tol: float = 1e-11, maxiter: int = 100
) -> torch.Tensor:
    """Minimise the full-batch inner loss in theta by Newton's method with a dense Hessian
    (backtracking on the loss, so it converges from any start on these convex problems).
    The Cholesky factor is reused while the gradient norm falls by 10x per step (warm starts
    converge on one or two factorisations) and refreshed otherwise."""
    f = lambda t: P.inner(t, h)  # noqa: E731
    theta = theta.detach().clone()
    chol, prev = None, float("inf")
    for _ in range(maxiter):
        g = torch.func.grad(f)(theta)
        gn = float(g.norm())
        if gn <= tol:
            break
        if chol is None or gn > 0.1 * prev:
            chol = _factor(dense_hessian(P, theta, h))
        prev = gn
        step = _solve(chol, g)
        f0, s = float(f(theta)), 1.0
        while s > 1e-8 and float(f(theta - s * step)) > f0 + 1e-14 * abs(f0):
            s *= 0.5
        theta = theta - s * step
    return theta


def exact_hypergradient(P: Problem, h: torch.Tensor, theta_star: torch.Tensor) -> torch.Tensor:
    """dL/dh - d2f/(dh dtheta) H^{-1} dL/dtheta at ``theta_star``, by autograd and a dense solve."""
    t = theta_star.detach().requires_grad_(True)
    hh = h.detach().requires_grad_(True)
    L = P.outer(t, hh)
    gL_t, gL_h = torch.autograd.grad(L, (t, hh), allow_unused=True)
    gL_h = torch.zeros_like(hh) if gL_h is None else gL_h
    v = _solve(_factor(dense_hessian(P, t.detach(), hh.detach())), gL_t)
    gf_t = torch.autograd.grad(P.inner(t, hh), t, create_graph=True)[0]
    mixed = torch.autograd.grad(gf_t @ v.detach(), hh)[0]
    return (gL_h - mixed).detach()


def solve_inner(P: Problem, h: torch.Tensor, warm: torch.Tensor | None = None) -> torch.Tensor:
    if P.kind == "quadratic":
        return _quadratic_exact(P, h)[0]
    return newton(P, h, P.theta0 if warm is None else warm)


def hypergradient(
    P: Problem, h: torch.Tensor, warm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta*(h), grad h)`` in the problem's dtype (float64 for the reference)."""
    if P.kind == "quadratic":
        return _quadratic_exact(P, h)
    theta = solve_inner(P, h, warm)
    return theta, exact_hypergradient(P, h, theta)


def classification_error(P: Problem, theta: torch.Tensor, split: str = "test") -> float:
    X, y = P.tensors[f"X_{split}"], P.tensors[f"y_{split}"]
    if P.kind == "binary":
        return float(((X @ theta > 0) != (y > 0)).double().mean())
    logits = X @ theta.view(X.shape[1], -1)
    return float((logits.argmax(1) != y).double().mean())


def weight_auroc(P: Problem, h: torch.Tensor) -> float:
    """AUROC of ``sigmoid(h_i)`` separating clean (label unchanged) from corrupted samples."""
    clean = ~P.tensors["corrupted_mask"].bool().cpu().numpy()
    return float(roc_auc_score(clean, h.detach().double().cpu().numpy()))


class Evaluator:
    """Evaluates (theta, h, g) of a run against the float64 reference problem ``P64``."""

    def __init__(self, P64: Problem):
        self.P = P64
        self._warm: torch.Tensor | None = None

    def __call__(
        self, theta: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None = None
    ) -> dict[str, float]:
        P = self.P
        theta = theta.detach().to(torch.float64)
        h = h.detach().to(torch.float64)
        theta_star, grad = hypergradient(P, h, self._warm)
        self._warm = theta_star
        out = {
            "value": float(grad.square().sum()),
            "func": float(P.outer(theta_star, h)),
            "inner_distance": float((theta_star - theta).square().sum()),
        }
        if g is not None:
            err = float((g.detach().double() - grad).norm())
            out["hypergrad_rel_error"] = err / max(float(grad.norm()), 1e-300)
        if P.kind != "quadratic":
            out["test_error"] = classification_error(P, theta)
        if P.kind == "cleaning":
            out["auroc"] = weight_auroc(P, h)
        return out


def median_quartiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median and quartiles over seeds (axis 0), NaN-aware."""
    q = np.nanpercentile(values, [25, 50, 75], axis=0)
    return q[1], q[0], q[2]
