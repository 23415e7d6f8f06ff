"""Dataset distillation on digits: ten synthetic images that train a network from scratch.

Primitive: ``hg.unroll`` with a hand-written step map (full reverse-mode unrolling).
Why this one: the hyperparameters are the training *data* itself (and the learning rate), and
what matters is the network that a short training run on it produces: T gradient steps from
a random initialisation, nowhere near a minimum. The IFT would differentiate the wrong thing
(the limit of training, which also forgets the initialisation); the unroll differentiates the
procedure that is actually run, exactly, and a custom step map lets the learning rate be a
hyperparameter too (Wang et al. 2018, "Dataset Distillation").

One synthetic 8x8 image per class (labels fixed) and a log learning rate are learned so that
an MLP trained on those ten images for T steps, from a fresh random initialisation each outer
step, has a low loss on real training digits (scikit-learn's bundled set). The script compares
the test accuracy of networks trained that way on the distilled images, on ten random real
images (one per class, learning rate tuned on a grid), and on the full training set, and
saves the distilled images.

    python examples/dataset_distillation.py           # default size (about a minute)
    python examples/dataset_distillation.py --tiny    # the test suite's size
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


def device_of(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def mlp(p, x):
    return torch.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def random_init(hidden, g, dev):
    def u(*shape, fan_in):
        return ((torch.rand(*shape, generator=g) * 2 - 1) / fan_in**0.5).to(dev, torch.float64)

    return {"w1": u(64, hidden, fan_in=64), "b1": u(hidden, fan_in=64),
            "w2": u(hidden, 10, fan_in=hidden), "b2": u(10, fan_in=hidden)}


def make_step(labels):
    """One step of gradient descent on the synthetic set, differentiable in the images and in
    the learning rate: ``θ - exp(h["log_lr"]) ∇θ CE(mlp(θ, h["x"]), labels)``."""

    def step(p, h, t):
        p = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in p.items()}
        loss = F.cross_entropy(mlp(p, h["x"]), labels)
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=torch.is_grad_enabled())
        lr = h["log_lr"].exp()
        return {k: v - lr * g for (k, v), g in zip(p.items(), grads)}

    return step


def train_on(x, labels, lr, steps, p0):
    p = p0
    step = make_step(labels)
    h = {"x": x, "log_lr": torch.as_tensor(lr, dtype=torch.float64).log()}
    for t in range(steps):
        p = {k: v.detach() for k, v in step(p, h, t).items()}
    return p


def accuracy(p, X, y):
    return float((mlp(p, X).argmax(1) == y).to(torch.float64).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (the tests')")
    ap.add_argument("--outer-steps", type=int, default=500)
    ap.add_argument("--inner-steps", type=int, default=20, help="T: training steps unrolled")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256, help="real digits per outer loss")
    ap.add_argument("--lr", type=float, default=0.02, help="Adam step on the images")
    ap.add_argument("--eval-inits", type=int, default=20, help="random inits per evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--out", default="runs/examples/dataset_distillation")
    args = ap.parse_args(argv)
    if args.tiny:
        args.outer_steps, args.inner_steps, args.eval_inits = 3, 5, 2
    torch.set_num_threads(1)
    dev = device_of(args.device)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=g)
    tr, te = perm[:1200], perm[1200:]
    Xtr, ytr, Xte, yte = X[tr].to(dev), y[tr].to(dev), X[te].to(dev), y[te].to(dev)
    labels = torch.arange(10, device=dev)
    real = torch.stack([Xtr[ytr == c][0] for c in range(10)])  # one real image per class

    h = {"x": real.clone().requires_grad_(True),
         "log_lr": torch.tensor(0.1, dtype=torch.float64, device=dev).log().requires_grad_(True)}
    opt = torch.optim.Adam([{"params": [h["x"]], "lr": args.lr},
                            {"params": [h["log_lr"]], "lr": 0.01}])
    step = make_step(labels)
    losses = []
    for _ in trange(args.outer_steps, desc="outer steps", disable=args.tiny):
        p0 = random_init(args.hidden, g, dev)
        p_T = hg.unroll(step, p0, h, steps=args.inner_steps)  # every step recorded
        idx = torch.randint(len(Xtr), (args.batch,), generator=g).to(dev)
        loss = F.cross_entropy(mlp(p_T, Xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    def evaluate(x, lr, steps):
        accs = [accuracy(train_on(x, labels, lr, steps, random_init(args.hidden, g, dev)),
                         Xte, yte) for _ in range(args.eval_inits)]
        t = torch.tensor(accs)
        return float(t.mean()), float(t.std())

    lr_learned = float(h["log_lr"].exp())
    acc_distilled = evaluate(h["x"].detach(), lr_learned, args.inner_steps)
    grid = [0.03, 0.1, 0.3, 1.0, 3.0]
    acc_real = max((evaluate(real, lr, args.inner_steps) for lr in grid), key=lambda r: r[0])
    p = random_init(args.hidden, g, dev)
    full_step = make_step(ytr)
    for t in range(args.inner_steps * (1 if args.tiny else 25)):  # full-batch GD, many steps
        p = {k: v.detach() for k, v in full_step(p, {"x": Xtr, "log_lr": torch.tensor(0.0)},
                                                 t).items()}
    acc_full = accuracy(p, Xte, yte)
    wall = time.perf_counter() - t0

    print(f"test accuracy of an MLP trained for {args.inner_steps} steps on 10 images "
          f"(mean +- std over {args.eval_inits} random inits):")
    print(f"  distilled images (learned lr {lr_learned:.3f}): "
          f"{acc_distilled[0]:.4f} +- {acc_distilled[1]:.4f}")
    print(f"  random real images (best lr of {grid}): {acc_real[0]:.4f} +- {acc_real[1]:.4f}")
    print(f"  reference, all {len(tr)} training images: {acc_full:.4f} ({wall:.1f} s)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 11, figsize=(13, 3), gridspec_kw={"width_ratios": [1] * 10 + [3]})
    for c in range(10):
        axes[0, c].imshow(real[c].reshape(8, 8).cpu(), cmap="gray_r")
        axes[1, c].imshow(h["x"][c].detach().reshape(8, 8).cpu(), cmap="gray_r")
        axes[0, c].set_title(str(c))
        for r in (0, 1):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    axes[0, 0].set_ylabel("real")
    axes[1, 0].set_ylabel("distilled")
    gs = axes[0, 10].get_gridspec()
    axes[0, 10].remove()
    axes[1, 10].remove()
    ax = fig.add_subplot(gs[:, 10])
    ax.plot(losses)
    ax.set(xlabel="outer step", ylabel="real-data loss", title="outer loss")
    fig.tight_layout()
    fig.savefig(out / "dataset_distillation.png", dpi=110)
    result = {"test_acc": {"distilled": acc_distilled, "random_real": acc_real,
                           "full_data": acc_full},
              "learned_lr": lr_learned, "outer_loss": losses, "wall_s": wall,
              "distilled_images": h["x"].detach().cpu().tolist(), "args": vars(args)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
