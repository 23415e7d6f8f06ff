"""A deep equilibrium (DEQ) layer on digits, trained through its fixed point.

Primitive: ``hg.fixed_point_solution`` (implicit differentiation of ``z* = T(z*, x; W)``).
Why this one: a DEQ layer's output is *defined* as the equilibrium ``z* = tanh(W z* + U x + b)``,
found by any root-finder with any number of iterations. Differentiating the iterations would
cost memory linear in their number and differentiate the solver's accidents; the IFT
differentiates the equilibrium itself, ``dz*/dW = (I - ∂T/∂z)⁻¹ ∂T/∂W``, with one
non-symmetric linear solve (GMRES) in the backward pass, memory independent of the forward
iterations (Bai et al. 2019). ``fixed_point_solution`` is the composable form: its output goes
into the classifier head and ``loss.backward()`` fills every parameter's ``.grad``.

The map is kept contractive by rescaling ``W`` to spectral norm at most ``--max-norm`` < 1, so
plain fixed-point iteration converges. The script trains the DEQ classifier on scikit-learn's
bundled digits, checks once that the IFT gradient equals back-propagation through 100 forward
iterations, and prints the test accuracy and the solver statistics (forward iterations, GMRES
iterations, the contraction estimate the backward reports).

    python examples/deq_fixed_point.py           # default size (about a minute)
    python examples/deq_fixed_point.py --tiny    # the test suite's size
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tqdm import trange  # noqa: E402

import hypergrad as hg  # noqa: E402


def device_of(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_map(x, max_norm):
    """T(z, h) = tanh(z W^T + x U^T + b), with W rescaled to spectral norm <= max_norm (so T
    is a contraction in z: ||∂T/∂z|| <= ||W|| < 1)."""

    def T(z, h):
        W = h["W"] * (max_norm / torch.linalg.matrix_norm(h["W"], ord=2).clamp(min=max_norm))
        return torch.tanh(z @ W.T + x @ h["U"].T + h["b"])

    return T


def solve(T, h, z0, tol, max_iter):
    """Plain fixed-point iteration (no graph): converges since T is a contraction."""
    z, iters = z0, 0
    with torch.no_grad():
        while iters < max_iter:
            z_new = T(z, h)
            iters += 1
            done = (z_new - z).norm() <= tol * z_new.norm()
            z = z_new
            if done:
                break
    return z, iters


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (the tests')")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--max-norm", type=float, default=0.9, help="spectral norm bound of W")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tol", type=float, default=1e-8, help="forward fixed-point tolerance")
    ap.add_argument("--gmres-iters", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--out", default="runs/examples/deq_fixed_point")
    args = ap.parse_args(argv)
    if args.tiny:
        args.epochs = 1
    torch.set_num_threads(1)
    dev = device_of(args.device)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=g)
    tr, te = perm[:1300], perm[1300:]
    if args.tiny:
        tr = tr[:200]
    Xtr, ytr, Xte, yte = X[tr].to(dev), y[tr].to(dev), X[te].to(dev), y[te].to(dev)
    d, n = args.hidden, 64

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dev)

    h = {"W": rnd(d, d, scale=0.5 / d**0.5), "U": rnd(d, n, scale=1 / n**0.5),
         "b": torch.zeros(d, dtype=torch.float64, device=dev)}
    head = {"V": rnd(10, d, scale=1 / d**0.5), "c": torch.zeros(10, dtype=torch.float64,
                                                                 device=dev)}
    for t in (*h.values(), *head.values()):
        t.requires_grad_(True)
    opt = torch.optim.Adam([*h.values(), *head.values()], lr=args.lr)
    gmres = partial(hg.gmres, maxiter=args.gmres_iters, restart=args.gmres_iters, tol=1e-8)

    def forward(x, info=None):
        T = make_map(x, args.max_norm)
        z0 = torch.zeros(len(x), d, dtype=torch.float64, device=dev)
        z_star, iters = solve(T, {k: v.detach() for k, v in h.items()}, z0, args.tol, 500)
        z = hg.fixed_point_solution(T, z_star, h, solver=gmres, info=info)
        return z @ head["V"].T + head["c"], iters

    # the check: the IFT gradient equals back-propagation through 100 plain iterations
    xb, yb = Xtr[:50], ytr[:50]
    info: dict = {}
    logits, _ = forward(xb, info)
    g_ift = torch.autograd.grad(F.cross_entropy(logits, yb), list(h.values()))
    T = make_map(xb, args.max_norm)
    z = torch.zeros(len(xb), d, dtype=torch.float64, device=dev)
    for _ in range(100):
        z = T(z, h)
    g_bp = torch.autograd.grad(F.cross_entropy(z @ head["V"].T + head["c"], yb), list(h.values()))
    err = hg.testing.compare(list(g_ift), list(g_bp)).rel_error
    print(f"check: fixed_point_solution gradient vs backprop through 100 iterations, "
          f"rel. error {err:.1e}")
    assert err < 1e-6, err

    losses, fwd_iters, solve_iters, contraction = [], [], [], []
    for _ in trange(args.epochs, desc="epochs", disable=args.tiny):
        order = torch.randperm(len(Xtr), generator=g).to(dev)
        for i in range(0, len(Xtr), args.batch):
            idx = order[i:i + args.batch]
            info = {}
            logits, iters = forward(Xtr[idx], info)
            loss = F.cross_entropy(logits, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            fwd_iters.append(iters)
            solve_iters.append(int(info["solve"].iterations))
            contraction.append(float(info["contraction"]) if "contraction" in info else None)
    with torch.no_grad():
        acc = float((forward(Xte)[0].argmax(1) == yte).to(torch.float64).mean())
    wall = time.perf_counter() - t0
    contr = [c for c in contraction if c is not None]
    print(f"DEQ classifier (hidden {d}, ||W|| <= {args.max_norm}) on digits: test accuracy "
          f"{acc:.4f} after {args.epochs} epochs ({wall:.1f} s)")
    print(f"  forward fixed-point iterations: median {int(torch.tensor(fwd_iters).median())}, "
          f"GMRES iterations in the backward: median "
          f"{int(torch.tensor(solve_iters).median())}"
          + (f", largest contraction estimate {max(contr):.3f}" if contr else ""))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    a.plot(losses)
    a.set(xlabel="training step", ylabel="cross-entropy",
          title=f"DEQ on digits (test acc {acc:.3f})")
    b.plot(fwd_iters, label="forward iterations")
    b.plot(solve_iters, label="GMRES iterations (backward)")
    b.set(xlabel="training step", title="solver work per step")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "deq_fixed_point.png", dpi=110)
    result = {"test_acc": acc, "check_rel_error": err, "losses": losses,
              "forward_iterations": fwd_iters, "gmres_iterations": solve_iters,
              "contraction": contraction, "wall_s": wall, "args": vars(args)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
