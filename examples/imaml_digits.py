"""iMAML few-shot classification on digits, with CG damping as the proximal strength.

Primitive: ``hg.make_hvp`` + ``hg.cg(..., damping=λ)`` (the implicit meta-gradient of iMAML),
checked against ``hg.implicit_grad`` on the proximal inner loss.
Why this one: iMAML's inner problem is "adapt to the task, but stay close to the
meta-parameters", ``θ*(φ) = argmin_θ L_support(θ) + λ/2 ||θ - φ||²``. The IFT at θ* gives the
meta-gradient ``dL_query/dφ = λ (H + λ I)⁻¹ ∇L_query(θ*)`` with H the Hessian of the support
loss alone, i.e. one CG solve whose Tikhonov damping *is* the proximal strength λ. Unlike
MAML it does not differentiate through the adaptation steps: memory is independent of their
number and any inner optimiser works (Rajeswaran et al. 2019).

Tasks are N-way K-shot problems drawn from scikit-learn's bundled 8x8 digits, where each digit
at each right-angle rotation is a class (as Omniglot is augmented): meta-training uses the 24
classes of digits 0-5, meta-testing the 16 classes of the unseen digits 6-9 (labels shuffled
per task). The model is
a small MLP. The script prints the meta-test accuracy after adaptation from the random
initialisation and from the meta-learned one, and saves the accuracy along meta-training.

    python examples/imaml_digits.py           # default size (a few minutes)
    python examples/imaml_digits.py --tiny    # the test suite's size
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


def init_params(n_in, hidden, n_out, g, dev):
    def u(*shape, fan_in):
        return ((torch.rand(*shape, generator=g) * 2 - 1) / fan_in**0.5).to(dev, torch.float64)

    return {"w1": u(n_in, hidden, fan_in=n_in), "b1": u(hidden, fan_in=n_in),
            "w2": u(hidden, n_out, fan_in=hidden), "b2": u(n_out, fan_in=hidden)}


class Tasks:
    """N-way K-shot tasks over a list of classes (each a tensor of images), labels shuffled."""

    def __init__(self, classes, n_way, k_shot, n_query, g):
        self.classes = classes
        self.n_way, self.k_shot, self.n_query, self.g = n_way, k_shot, n_query, g

    def sample(self):
        cls = torch.randperm(len(self.classes), generator=self.g)[: self.n_way]
        xs, ys, xq, yq = [], [], [], []
        for label, c in enumerate(cls.tolist()):
            pool = self.classes[c]
            idx = torch.randperm(len(pool), generator=self.g)[: self.k_shot + self.n_query]
            xs.append(pool[idx[: self.k_shot]])
            xq.append(pool[idx[self.k_shot:]])
            ys += [label] * self.k_shot
            yq += [label] * self.n_query
        dev = xs[0].device
        return (torch.cat(xs), torch.tensor(ys, device=dev),
                torch.cat(xq), torch.tensor(yq, device=dev))


def rotated_classes(X, y, digits):
    """Each digit at each of the 4 right-angle rotations is its own class (the Omniglot
    augmentation of Santoro et al. 2016): 4 classes per digit."""
    imgs = X.reshape(-1, 8, 8)
    return [torch.rot90(imgs[y == d], k, dims=(1, 2)).reshape(-1, 64)
            for d in digits for k in range(4)]


def adapt(phi, xs, ys, lam, iters):
    """θ* = argmin_θ CE_support(θ) + λ/2 ||θ - φ||² by L-BFGS from φ (strongly convex near φ,
    so it converges in a few dozen iterations; the IFT needs a stationary point)."""
    flat_phi, unravel = tree.ravel(tree.detach(phi))

    def prox_loss(x):
        return F.cross_entropy(mlp(unravel(x), xs), ys) + lam / 2 * ((x - flat_phi) ** 2).sum()

    x = flat_phi.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], max_iter=iters, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = prox_loss(x)
        loss.backward()
        return loss

    with torch.enable_grad():
        g0 = torch.autograd.grad(prox_loss(x), x)[0].norm()
        opt.step(closure)
        g1 = torch.autograd.grad(prox_loss(x), x)[0].norm()
    adapt.stationarity.append(float(g1 / g0))
    return unravel(x.detach())


adapt.stationarity = []  # ||∇f(θ_T)|| / ||∇f(φ)|| of every inner solve


def meta_gradient(phi, task, args, check=False):
    xs, ys, xq, yq = task
    theta = adapt(phi, xs, ys, args.lam, args.inner_iters)

    def support(p):
        return F.cross_entropy(mlp(p, xs), ys)

    def query(p, h=None):
        return F.cross_entropy(mlp(p, xq), yq)

    g_query = torch.func.grad(query)(theta)
    # iMAML: dL/dφ = λ (H + λ I)^-1 ∇L_query, H the support loss's Hessian at θ*
    res = hg.cg(hg.make_hvp(support, theta), g_query, damping=args.lam, maxiter=args.cg_iters,
                tol=1e-10)
    mg = tree.scale(res.solution, args.lam)
    if check:  # the same quantity as the IFT on the proximal inner loss, by hypergrad's IFT
        def inner(p, h):
            return support(p) + args.lam / 2 * tree.vdot(tree.sub(p, h), tree.sub(p, h))

        def exact(mv, b):
            return hg.cg(mv, b, maxiter=500, tol=1e-13)

        ref = hg.implicit_grad(inner, query, theta, tree.detach(phi), on_failure="ignore",
                               solver=exact)
        full = exact(lambda v: tree.axpy(args.lam, v, hg.make_hvp(support, theta)(v)), g_query)
        err = hg.testing.compare(tree.scale(full.solution, args.lam), ref).rel_error
        err_j = hg.testing.compare(mg, ref).rel_error
        print(f"check: λ (H + λI)^-1 ∇L_query vs hg.implicit_grad on the proximal loss: rel. "
              f"error {err:.1e} (solved to 1e-13), {err_j:.1e} with {args.cg_iters} CG steps")
        assert err < 1e-8, err
    acc = (mlp(theta, xq).argmax(1) == yq).to(torch.float64).mean()
    return mg, float(query(theta)), float(acc), res


def evaluate(phi, tasks, args):
    accs = []
    for task in tasks:
        xs, ys, xq, yq = task
        theta = adapt(phi, xs, ys, args.lam, args.inner_iters)
        accs.append(float((mlp(theta, xq).argmax(1) == yq).to(torch.float64).mean()))
    t = torch.tensor(accs)
    return float(t.mean()), float(t.std() / len(t) ** 0.5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (the tests')")
    ap.add_argument("--meta-steps", type=int, default=300)
    ap.add_argument("--meta-batch", type=int, default=4, help="tasks per meta step")
    ap.add_argument("--meta-lr", type=float, default=3e-3)
    ap.add_argument("--n-way", type=int, default=5)
    ap.add_argument("--k-shot", type=int, default=1)
    ap.add_argument("--n-query", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lam", type=float, default=1.0, help="proximal strength = CG damping")
    ap.add_argument("--inner-iters", type=int, default=30, help="L-BFGS iterations")
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--eval-tasks", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--out", default="runs/examples/imaml_digits")
    args = ap.parse_args(argv)
    if args.tiny:
        args.meta_steps, args.meta_batch, args.eval_tasks, args.eval_every = 4, 2, 10, 2
    torch.set_num_threads(1)
    dev = device_of(args.device)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64, device=dev)
    y = torch.tensor(y, device=dev)
    # meta-train: digits 0-5 (24 rotated classes); meta-test: unseen digits 6-9 (16 classes)
    train = Tasks(rotated_classes(X, y, range(0, 6)), args.n_way, args.k_shot, args.n_query, g)
    test = Tasks(rotated_classes(X, y, range(6, 10)), args.n_way, args.k_shot, args.n_query, g)
    test_tasks = [test.sample() for _ in range(args.eval_tasks)]

    phi0 = init_params(64, args.hidden, args.n_way, g, dev)
    acc0 = evaluate(phi0, test_tasks, args)
    phi = {k: v.clone().requires_grad_(True) for k, v in phi0.items()}
    opt = torch.optim.Adam(phi.values(), lr=args.meta_lr)
    curve = [(0, acc0[0])]
    train_acc, cg_res = [], []
    for step in trange(1, args.meta_steps + 1, desc="meta steps", disable=args.tiny):
        grads = []
        for i in range(args.meta_batch):
            mg, _, acc, res = meta_gradient(tree.detach(phi), train.sample(), args,
                                            check=(step == 1 and i == 0))
            grads.append(mg)
            train_acc.append(acc)
            cg_res.append(float(res.residual_norm))
        opt.zero_grad()
        for k in phi:
            phi[k].grad = sum(gr[k] for gr in grads) / len(grads)
        opt.step()
        if step % args.eval_every == 0:
            curve.append((step, evaluate(tree.detach(phi), test_tasks, args)[0]))
    acc1 = evaluate(tree.detach(phi), test_tasks, args)
    wall = time.perf_counter() - t0

    print(f"{args.n_way}-way {args.k_shot}-shot on the unseen digits 6-9 (16 rotated classes), "
          f"{args.eval_tasks} tasks, adaptation with λ = {args.lam}:")
    print(f"  from the random initialisation: {acc0[0]:.4f} +- {acc0[1]:.4f}")
    print(f"  from the iMAML initialisation:  {acc1[0]:.4f} +- {acc1[1]:.4f} "
          f"({args.meta_steps} meta steps, {wall:.1f} s)")
    st = torch.tensor(adapt.stationarity)
    print(f"  inner solves: relative gradient norm median {st.median():.1e}, max {st.max():.1e}")
    print(f"  median CG relative residual {torch.tensor(cg_res).median():.1e} "
          f"after {args.cg_iters} iterations")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    s, a = zip(*curve)
    ax.plot(s, a, marker="o", label="meta-test (unseen digits 6-9)")
    k = max(1, len(train_acc) // 50)
    sm = torch.tensor(train_acc).unfold(0, k, k).mean(1) if len(train_acc) >= k else []
    ax.plot([(i + 1) * k / args.meta_batch for i in range(len(sm))], sm, alpha=0.6,
            label="meta-train query (digits 0-5)")
    ax.axhline(1 / args.n_way, color="gray", ls=":", label="chance")
    ax.set(xlabel="meta step", ylabel="accuracy after adaptation",
           title=f"iMAML, {args.n_way}-way {args.k_shot}-shot digits, λ = {args.lam}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "imaml_digits.png", dpi=110)
    result = {"meta_test_acc": {"random_init": acc0, "imaml_init": acc1}, "curve": curve,
              "median_cg_residual": float(torch.tensor(cg_res).median()), "wall_s": wall,
              "args": vars(args)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
