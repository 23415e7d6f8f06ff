"""Learning an optimiser's hyperparameters (learning rate, momentum, weight decay) by forward mode.

Primitive: ``hg.forward_hypergrad`` (forward-mode differentiation along the training run).
Why this one: the learning rate and the momentum do not change the optimum of the training
loss, only the path to it, so the implicit function theorem has nothing to say about them:
the hypergradient must go through the T training steps. With only 3 hyperparameters, forward
mode carries 3 tangents ``dθ_t/dφ`` along the run and needs memory independent of T, where
reverse-mode unrolling stores every step's graph (memory linear in T); both give the same
number (Franceschi et al. 2017), which the script checks on the first outer step.

An MLP is trained on scikit-learn's bundled digits for T steps of heavy-ball SGD with
minibatches (the same sequence of batches for every outer step),

    v_{t+1} = μ v_t + ∇f(θ_t) + λ θ_t,      θ_{t+1} = θ_t - η v_{t+1},

with φ = (log η, logit μ, log λ). The outer loss is the validation cross-entropy at θ_T; φ
follows its hypergradient with Adam. The script prints the validation and test accuracy with
the initial and the learned hyperparameters and saves their trajectories.

    python examples/optimizer_hyperparams.py           # default size (a few minutes)
    python examples/optimizer_hyperparams.py --tiny    # the test suite's size
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tqdm import trange  # noqa: E402

import hypergrad as hg  # noqa: E402
from hypergrad import tree  # noqa: E402


def device_of(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def mlp(p, x):
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def init(hidden, g, dev):
    def u(*shape, fan_in):
        return ((torch.rand(*shape, generator=g) * 2 - 1) / fan_in**0.5).to(dev, torch.float64)

    return {"w1": u(64, hidden, fan_in=64), "b1": u(hidden, fan_in=64),
            "w2": u(hidden, 10, fan_in=hidden), "b2": u(10, fan_in=hidden)}


def make_step(X, y, batches):
    """Heavy-ball SGD on minibatch ``batches[t]``, differentiable in state and hyperparameters.
    State: ``(params, velocity)``; hparams: ``log_lr``, ``logit_momentum``, ``log_wd``."""

    def step(state, h, t):
        p, v = state
        p = {k: x if x.requires_grad else x.detach().requires_grad_(True) for k, x in p.items()}
        idx = batches[t]
        loss = F.cross_entropy(mlp(p, X[idx]), y[idx])
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        lr, mu, wd = h["log_lr"].exp(), torch.sigmoid(h["logit_momentum"]), h["log_wd"].exp()
        v = {k: mu * v[k] + g + wd * p[k] for k, g in zip(p, grads)}
        p = {k: p[k] - lr * v[k] for k in p}
        return (p, v)

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (the tests')")
    ap.add_argument("--outer-steps", type=int, default=40)
    ap.add_argument("--inner-steps", type=int, default=200, help="T: SGD steps per run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--meta-lr", type=float, default=0.1, help="Adam step on the hparams")
    ap.add_argument("--lr0", type=float, default=0.01, help="initial learning rate")
    ap.add_argument("--momentum0", type=float, default=0.5)
    ap.add_argument("--wd0", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--out", default="runs/examples/optimizer_hyperparams")
    args = ap.parse_args(argv)
    if args.tiny:
        args.outer_steps, args.inner_steps = 2, 10
    torch.set_num_threads(1)
    dev = device_of(args.device)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=g)
    tr, va, te = perm[:1000], perm[1000:1400], perm[1400:]
    Xtr, ytr, Xva, yva, Xte, yte = (t.to(dev) for t in (X[tr], y[tr], X[va], y[va], X[te], y[te]))
    batches = [torch.randint(len(tr), (args.batch,), generator=g).to(dev)
               for _ in range(args.inner_steps)]
    step = make_step(Xtr, ytr, batches)
    p0 = init(args.hidden, g, dev)
    state0 = (p0, tree.zeros_like(p0))

    def outer(state, h):
        return F.cross_entropy(mlp(state[0], Xva), yva)

    def scalar(v):
        return torch.tensor(v, dtype=torch.float64, device=dev)

    h = {"log_lr": scalar(args.lr0).log(),
         "logit_momentum": torch.logit(scalar(args.momentum0)),
         "log_wd": scalar(args.wd0).log()}

    # the check: forward mode equals the full reverse-mode unroll
    g_fwd = hg.forward_hypergrad(step, state0, h, args.inner_steps, outer)
    hr = {k: v.clone().requires_grad_(True) for k, v in h.items()}
    outer(hg.unroll(step, state0, hr, steps=args.inner_steps), hr).backward()
    err = hg.testing.compare(g_fwd, {k: v.grad for k, v in hr.items()}).rel_error
    print(f"check: forward_hypergrad vs reverse-mode unroll over {args.inner_steps} steps, "
          f"rel. error {err:.1e}")
    assert err < 1e-8, err

    def run(hp):
        s = state0
        for t in range(args.inner_steps):
            s = tree.detach(step(s, hp, t))
        p = s[0]
        acc = [float((mlp(p, Xs).argmax(1) == ys).to(torch.float64).mean())
               for Xs, ys in ((Xva, yva), (Xte, yte))]
        return float(outer(s, hp)), acc

    val0, (va0, te0) = run(h)
    phi = {k: v.clone().requires_grad_(True) for k, v in h.items()}
    opt = torch.optim.Adam(phi.values(), lr=args.meta_lr)
    history = []
    for _ in trange(args.outer_steps, desc="outer steps", disable=args.tiny):
        cur = tree.detach(phi)
        hgrad = hg.forward_hypergrad(step, state0, cur, args.inner_steps, outer)
        history.append({"lr": float(cur["log_lr"].exp()),
                        "momentum": float(torch.sigmoid(cur["logit_momentum"])),
                        "wd": float(cur["log_wd"].exp())})
        opt.zero_grad()
        for k in phi:
            phi[k].grad = hgrad[k]
        opt.step()
    learned = tree.detach(phi)
    val1, (va1, te1) = run(learned)
    final = {"lr": float(learned["log_lr"].exp()),
             "momentum": float(torch.sigmoid(learned["logit_momentum"])),
             "wd": float(learned["log_wd"].exp())}
    history.append(final)
    wall = time.perf_counter() - t0

    print(f"{args.inner_steps} steps of heavy-ball SGD on an MLP, digits:")
    print(f"  initial lr {args.lr0:.3g}, momentum {args.momentum0:.3g}, wd {args.wd0:.3g}: "
          f"val loss {val0:.4f}, val acc {va0:.4f}, test acc {te0:.4f}")
    print(f"  learned lr {final['lr']:.3g}, momentum {final['momentum']:.3g}, wd "
          f"{final['wd']:.3g}: val loss {val1:.4f}, val acc {va1:.4f}, test acc {te1:.4f} "
          f"({args.outer_steps} outer steps, {wall:.1f} s)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key in zip(axes, ("lr", "momentum", "wd")):
        ax.plot([r[key] for r in history], marker=".")
        ax.set(xlabel="outer step", title=key, yscale="log" if key != "momentum" else "linear")
    fig.suptitle(f"hyperparameters learned by forward mode (test acc {te0:.3f} -> {te1:.3f})")
    fig.tight_layout()
    fig.savefig(out / "optimizer_hyperparams.png", dpi=110)
    result = {"check_rel_error": err, "initial": {"val_loss": val0, "val_acc": va0,
                                                  "test_acc": te0},
              "learned": {"val_loss": val1, "val_acc": va1, "test_acc": te1, **final},
              "history": history, "wall_s": wall, "args": vars(args)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
