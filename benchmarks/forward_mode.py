"""Forward mode against the reverse-mode code it replaces: time, peak memory, agreement.

Two studies (results: benchmarks/results/forward_mode.json and forward_mode.png):

1. ``implicit_jacobian`` vs the loop of per-output reverse solves. Multinomial logistic
   regression, 64 features x 10 classes = 640 params, 400 examples, float64, fitted by Newton to
   machine precision; hparams = log L2 strengths, one (scalar), per feature (64) or per weight
   (640). Compared: ``hg.implicit_jacobian`` (mode auto, and forced reverse), the loop a user
   writes today (640 x ``hg.implicit_grad`` with outer loss ``params[i]``), and the best
   hand-written reverse loop (one ``make_hvp`` operator, 640 CG solves + mixed products). All
   with ``hg.cg(tol=1e-10, maxiter=500)``; agreement against the dense ``-H^{-1} M``.
2. ``forward_hypergrad`` vs ``unroll`` (full reverse mode) along T SGD steps (lr 0.1) on an MLP
   64-128-10 (tanh, 9,610 params, batch 256, float32), hparams = k per-group example-weight
   logits (example i weighted by 2 sigmoid(h[i mod k])), T in 10/100/1000, k in 1/5/50; plus
   torchopt Adam at T = 100. Time: min over interleaved rounds in one process; peak memory: each
   configuration in a fresh process (benchmarks/memory.py's method: rise of VmHWM after a
   clear_refs reset, MALLOC_MMAP_THRESHOLD_=65536). Agreement checked in float64 at T = 10.
   Also: the per-step Jacobian-vector product as ``forward_hypergrad`` computes it (reverse-over-
   reverse through the step's vector-Jacobian product) vs ``torch.autograd.forward_ad`` dual
   numbers through the same step (k = 1).

    python -m benchmarks.forward_mode                  # both studies (~15 min on 2 shared cores)
    python -m benchmarks.forward_mode --tiny --out /tmp/fm   # seconds: the smoke test's size
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hypergrad as hg
from hypergrad import tree

from . import timing

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# --- study 1: implicit_jacobian ----------------------------------------------------------------
def logreg(n_h: str, d: int = 64, c: int = 10, n: int = 400, device="cpu"):
    """Multinomial logistic regression with log L2 strengths ``h`` of shape () / (d,) / (c, d)."""
    g = torch.Generator().manual_seed(0)
    kw = {"dtype": torch.float64}
    W_true = torch.randn(c, d, generator=g, **kw)
    X = torch.randn(n, d, generator=g, **kw)
    y = torch.argmax(X @ W_true.T + torch.randn(n, c, generator=g, **kw), 1)  # noisy labels
    shape = {"scalar": (), "feature": (d,), "weight": (c, d)}[n_h]
    h = (torch.randn(shape, generator=g, **kw) * 0.3 - 2.0)
    X, y, h = X.to(device), y.to(device), h.to(device)

    def f(W, h):
        return F.cross_entropy(X @ W.T, y) + 0.5 * (h.exp() * W**2).sum()

    W = torch.zeros(c, d, device=device, **kw)
    for _ in range(30):  # Newton: the objective is strongly convex
        gW = torch.func.grad(f)(W, h).reshape(-1)
        H = torch.func.hessian(f)(W, h).reshape(c * d, c * d)
        step = torch.linalg.solve(H, gW)
        W = W - step.reshape(c, d)
        if float(step.norm()) < 1e-14 * (1 + float(W.norm())):
            break
    return f, W, h


def dense_jacobian(f, W, h):
    n_p, n_h = W.numel(), h.numel()
    H = torch.func.hessian(f)(W, h).reshape(n_p, n_p)
    M = torch.func.jacrev(torch.func.grad(f), argnums=1)(W, h).reshape(n_p, n_h)
    return -torch.linalg.solve(H, M).reshape(*W.shape, *h.shape)


def jacobian_methods(f, W, h, solver):
    def loop_implicit_grad():
        rows = [hg.implicit_grad(f, lambda p, hh, i=i: p.reshape(-1)[i], W, h, solver=solver,
                                 stationarity_tol=None)
                for i in range(W.numel())]
        return torch.stack(rows).reshape(*W.shape, *h.shape)

    def loop_one_operator():
        op = hg.HessianOperator(f, W, h, ())
        rows = []
        for i in range(W.numel()):
            e = torch.zeros(W.numel(), dtype=W.dtype, device=W.device)
            e[i] = 1
            w = solver(op, e.reshape(W.shape)).solution
            rows.append(-op.mixed_vjp(w))
        return torch.stack(rows).reshape(*W.shape, *h.shape)

    kw = {"solver": solver, "stationarity_tol": None}
    return {
        "implicit_jacobian": lambda: hg.implicit_jacobian(f, W, h, **kw),
        "implicit_jacobian_reverse": lambda: hg.implicit_jacobian(f, W, h, mode="reverse", **kw),
        "loop_implicit_grad": loop_implicit_grad,
        "loop_one_operator": loop_one_operator,
    }


def study_jacobian(args) -> dict:
    solver = functools.partial(hg.cg, tol=1e-10, maxiter=500)
    out = {}
    cases = ["scalar", "feature"] if args.tiny else ["scalar", "feature", "weight"]
    for case in cases:
        kw = {"d": 8, "c": 3, "n": 60} if args.tiny else {}
        f, W, h = logreg(case, device=args.device, **kw)
        ref = dense_jacobian(f, W, h)
        fns = jacobian_methods(f, W, h, solver)
        _, info = hg.implicit_jacobian(f, W, h, solver=solver, return_info=True)
        err = {k: float((fn() - ref).norm() / ref.norm()) for k, fn in fns.items()}
        t = timing.interleaved(fns, rounds=args.jac_rounds, min_time=0.0)
        sec = {k: min(v) for k, v in t.items()}
        out[case] = {
            "n_params": W.numel(), "n_hparams": h.numel(), "auto_mode": info["mode"],
            "cg_iterations": [int(r.iterations) for r in info["solves"]],
            "seconds": sec, "rel_err_vs_dense": err,
            "speedup_vs_loop_implicit_grad": sec["loop_implicit_grad"] / sec["implicit_jacobian"],
            "speedup_vs_loop_one_operator": sec["loop_one_operator"] / sec["implicit_jacobian"],
        }
        _log(args, f"jacobian {case}: {out[case]['speedup_vs_loop_implicit_grad']:.1f}x faster "
             f"than the implicit_grad loop; errors {err}")
    return out


# --- study 2: forward_hypergrad vs unroll -------------------------------------------------------
def mlp_problem(k: int, dtype=torch.float32, device="cpu", n: int = 256, d: int = 64,
                hidden: int = 128, c: int = 10):
    g = torch.Generator().manual_seed(1)
    kw = {"dtype": torch.float64}
    X = torch.randn(n, d, generator=g, **kw)
    teacher = torch.randn(d, c, generator=g, **kw)
    y = torch.argmax(X @ teacher, 1)
    Xv = torch.randn(n, d, generator=g, **kw)
    yv = torch.argmax(Xv @ teacher, 1)
    p0 = {"W1": torch.randn(hidden, d, generator=g, **kw) / d**0.5,
          "b1": torch.zeros(hidden, **kw),
          "W2": torch.randn(c, hidden, generator=g, **kw) / hidden**0.5,
          "b2": torch.zeros(c, **kw)}
    grp = torch.arange(n, device=device) % k
    X, Xv = X.to(device, dtype), Xv.to(device, dtype)
    y, yv = y.to(device), yv.to(device)
    p0 = {k_: v.to(device, dtype) for k_, v in p0.items()}
    h = torch.zeros(k, dtype=dtype, device=device)

    def net(p, x):
        return torch.tanh(x @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"]

    def inner(p, h):
        ce = F.cross_entropy(net(p, X), y, reduction="none")
        return (2 * torch.sigmoid(h)[grp] * ce).mean() + 1e-3 * sum((v**2).sum()
                                                                   for v in p.values())

    def outer(p, h):
        return F.cross_entropy(net(p, Xv), yv)

    return inner, outer, p0, h


def _inner_grad(inner, p0, h):
    p = tree.detach(p0, requires_grad=True)
    return torch.autograd.grad(inner(p, h), list(p.values()))


def trajectory_methods(inner, outer, p0, h, T: int, optimizer: str):
    if optimizer == "sgd":
        step = hg.gradient_step(inner, lr=0.1)
        state0, val = p0, outer
    else:
        import torchopt

        opt = torchopt.adam(lr=1e-3)
        step = hg.optimizer_step(inner, opt)
        state0, val = (p0, opt.init(p0)), (lambda s, hh: outer(s[0], hh))

    def forward():
        return hg.forward_hypergrad(step, state0, h, T, val)

    def unroll():
        hh = h.detach().clone().requires_grad_(True)
        return torch.autograd.grad(val(hg.unroll(step, state0, hh, T), hh), hh)[0]

    return {"forward": forward, "unroll": unroll}


def forward_ad_step(step, state, h, u):
    """One step and its JVP by dual numbers (the alternative forward_hypergrad does not use)."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        hd = fwAD.make_dual(h, u)
        sd = tree.map(lambda x: fwAD.make_dual(x.detach(), torch.zeros_like(x)).requires_grad_()
                      if x.is_floating_point() else x, state)
        out = step(sd, hd, 0)

        def tangent(x):
            t = fwAD.unpack_dual(x).tangent if x.is_floating_point() else None
            return torch.zeros_like(x) if t is None else t.detach()

        return tree.map(tangent, out)


def study_forward(args) -> dict:
    out: dict = {"agreement_f64": {}, "time": {}, "memory_kib": {}, "jvp_mechanism": {}}
    Ts, ks = args.Ts, args.ks
    # agreement in float64 (T = 10)
    for k in ks:
        for opt in ("sgd", "adam"):
            inner, outer, p0, h = mlp_problem(k, torch.float64, args.device, **args.mlp)
            fns = trajectory_methods(inner, outer, p0, h, 10, opt)
            a, b = fns["forward"](), fns["unroll"]()
            out["agreement_f64"][f"{opt} k={k}"] = float((a - b).norm() / b.norm())
    _log(args, f"agreement (float64, T=10): {out['agreement_f64']}")
    # time, interleaved per (T, k)
    for T in Ts:
        for k in ks:
            inner, outer, p0, h = mlp_problem(k, torch.float32, args.device, **args.mlp)
            fns = trajectory_methods(inner, outer, p0, h, T, "sgd")
            fns["grad"] = functools.partial(_inner_grad, inner, p0, h)
            t = timing.interleaved(fns, rounds=args.rounds, min_time=args.min_time)
            out["time"][f"sgd T={T} k={k}"] = {m: min(v) for m, v in t.items()}
            ratio = timing.ratio(t, "forward", "unroll")
            _log(args, f"time T={T} k={k}: forward/unroll = {ratio:.2f}")
    T = Ts[1] if len(Ts) > 1 else Ts[0]
    for k in ks:
        inner, outer, p0, h = mlp_problem(k, torch.float32, args.device, **args.mlp)
        fns = trajectory_methods(inner, outer, p0, h, T, "adam")
        t = timing.interleaved(fns, rounds=args.rounds, min_time=args.min_time)
        out["time"][f"adam T={T} k={k}"] = {m: min(v) for m, v in t.items()}
    # the JVP mechanism, one step, k = 1
    inner, outer, p0, h = mlp_problem(1, torch.float32, args.device, **args.mlp)
    for opt in ("sgd", "adam"):
        if opt == "sgd":
            step, state = hg.gradient_step(inner, lr=0.1), p0
        else:
            import torchopt

            o = torchopt.adam(lr=1e-3)
            step, state = hg.optimizer_step(inner, o), (p0, o.init(p0))
        Z = tree.map(lambda x: torch.zeros(1, *x.shape, dtype=x.dtype, device=x.device), state)
        U = torch.ones(1, 1, dtype=h.dtype, device=h.device)
        fns = {"step": functools.partial(step, state, h, 0),
               "step_jvp": functools.partial(hg.step_jvp, step, state, h, Z, U),
               "forward_ad": functools.partial(forward_ad_step, step, state, h, U[0])}
        t = timing.interleaved(fns, rounds=args.rounds, min_time=args.min_time)
        out["jvp_mechanism"][opt] = {m: min(v) for m, v in t.items()}
    # peak memory, each configuration in a fresh process (tiny: one, to keep the smoke test short)
    for T in Ts[:1] if args.tiny else Ts:
        for k in ks[:1] if args.tiny else ks:
            for method in ("forward", "unroll"):
                rec = measure_memory(method, T, k, args)
                out["memory_kib"][f"{method} T={T} k={k}"] = rec["peak_kib"]
        _log(args, f"memory T={T}: " + ", ".join(
            f"{kk}: {v / 1024:.0f} MiB" for kk, v in out["memory_kib"].items() if f"T={T} " in kk))
    return out


# --- fresh-process memory ----------------------------------------------------------------------
def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1))


def child(method: str, T: int, k: int, mlp: dict, device: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    inner, outer, p0, h = mlp_problem(k, torch.float32, device, **mlp)
    trajectory_methods(inner, outer, p0, h, min(T, 2), "sgd")[method]()  # warm-up
    fn = trajectory_methods(inner, outer, p0, h, T, "sgd")[method]
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return {"method": method, "T": T, "k": k, "peak_kib": _status_kib("VmHWM") - before,
            "seconds": seconds}


def measure_memory(method: str, T: int, k: int, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.forward_mode", "--child", method, "--T", str(T),
           "--k", str(k), "--device", str(args.device)] + (["--tiny"] if args.tiny else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- report -------------------------------------------------------------------------------------
def markdown(data: dict) -> str:
    """The RESULTS.md section body from the JSON."""
    load = f"load average {data.get('load_start', '?')} at the start, {data['load']} at the end"
    lines = [f"Measured {data['date']} in {data['seconds'] / 60:.0f} min ({data['machine']}; "
             f"{load}: other jobs shared the 2 cores). "
             "Times are min over interleaved rounds in one process; memory is the fresh-process "
             "peak rise (benchmarks/memory.py's method).", ""]
    jac = data.get("jacobian", {})
    if jac:
        lines += ["`implicit_jacobian` vs the per-output reverse loops it replaces (float64, "
                  "640-param multinomial logistic regression, CG tol 1e-10):", "",
                  "| hparams | mode (auto) | implicit_jacobian s | forced reverse s | loop of "
                  "implicit_grad s | loop on one operator s | speed-up vs implicit_grad loop | "
                  "vs one-operator loop | max rel err vs dense |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for case, r in jac.items():
            s = r["seconds"]
            lines.append(
                f"| {r['n_hparams']} ({case}) | {r['auto_mode']} | {s['implicit_jacobian']:.3f} | "
                f"{s['implicit_jacobian_reverse']:.3f} | {s['loop_implicit_grad']:.2f} | "
                f"{s['loop_one_operator']:.2f} | {r['speedup_vs_loop_implicit_grad']:.0f}x | "
                f"{r['speedup_vs_loop_one_operator']:.1f}x | "
                f"{max(r['rel_err_vs_dense'].values()):.1e} |")
        lines.append("")
    fw = data.get("forward", {})
    if fw:
        lines += ["`forward_hypergrad` vs full reverse-mode `unroll` along T SGD steps (MLP "
                  "64-128-10, 9,610 params, batch 256, float32; k hparams). Time in units of "
                  "one inner gradient; memory in MiB:", "",
                  "| T | k | forward time / grad | unroll time / grad | forward / unroll time | "
                  "forward MiB | unroll MiB |", "|---|---|---|---|---|---|---|"]
        for key, t in fw["time"].items():
            if not key.startswith("sgd"):
                continue
            T, k = re.findall(r"T=(\d+) k=(\d+)", key)[0]
            mf = fw["memory_kib"].get(f"forward T={T} k={k}")
            mu = fw["memory_kib"].get(f"unroll T={T} k={k}")
            lines.append(f"| {T} | {k} | {t['forward'] / t['grad']:.0f} | "
                         f"{t['unroll'] / t['grad']:.0f} | {t['forward'] / t['unroll']:.2f} | "
                         f"{_mib(mf)} | {_mib(mu)} |")
        adam = {k: v for k, v in fw["time"].items() if k.startswith("adam")}
        if adam:
            lines += ["", "torchopt Adam: " + "; ".join(
                f"{k}: forward / unroll = {v['forward'] / v['unroll']:.2f}"
                for k, v in adam.items()) + "."]
        mech = fw.get("jvp_mechanism", {})
        if mech:
            lines += ["", "One step's JVP (k = 1), in units of one plain step: " + "; ".join(
                f"{opt}: reverse-over-reverse (step_jvp) {m['step_jvp'] / m['step']:.1f}, "
                f"forward_ad dual numbers {m['forward_ad'] / m['step']:.1f}"
                for opt, m in mech.items()) + "."]
        agree = fw.get("agreement_f64", {})
        if agree:
            lines += ["", "Agreement with the reverse-mode unroll (float64, T = 10): max rel err "
                      f"{max(agree.values()):.1e} over {', '.join(agree)}."]
    return "\n".join(lines)


def _mib(kib) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def section(results_dir: Path = HERE / "results") -> str:
    """The RESULTS.md section (``report.py`` renders it into ``{{FORWARD_MODE}}``)."""
    path = Path(results_dir) / "forward_mode.json"
    if not path.exists():
        return "(not run: `python -m benchmarks.forward_mode`)"
    return markdown(json.loads(path.read_text()))


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fw = data["forward"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ks = sorted({int(m) for m in re.findall(r"k=(\d+)", " ".join(fw["time"]))})
    for k in ks:
        rows = [(int(re.findall(r"T=(\d+)", key)[0]), v) for key, v in fw["time"].items()
                if key.startswith("sgd") and key.endswith(f"k={k}")]
        Ts = [T for T, _ in rows]
        axes[0].plot(Ts, [v["forward"] / v["grad"] for _, v in rows], "o-",
                     label=f"forward, k={k}")
        axes[0].plot(Ts, [v["unroll"] / v["grad"] for _, v in rows], "x--",
                     label=f"unroll, k={k}")
        for method, style in (("forward", "o-"), ("unroll", "x--")):
            mem = [fw["memory_kib"].get(f"{method} T={T} k={k}", float("nan")) / 1024 for T in Ts]
            axes[1].plot(Ts, mem, style, label=f"{method}, k={k}")
    for ax, ylabel in zip(axes, ("time / one inner gradient", "peak memory (MiB)")):
        ax.set_xscale("log")
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if ys and min(ys) > 0:  # (tiny runs measure ~0 MiB)
            ax.set_yscale("log")
        ax.set_xlabel("T (SGD steps)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle("forward_hypergrad vs unroll (MLP 9.6k params, float32)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="jacobian,forward")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the smoke test)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jac-rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--child", choices=("forward", "unroll"), help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = _device(args.device)
    args.mlp = {"n": 32, "d": 8, "hidden": 16, "c": 3} if args.tiny else {}
    if args.child:
        print(json.dumps(child(args.child, args.T, args.k, args.mlp, args.device)))
        return None
    torch.set_num_threads(args.threads)
    args.Ts = [2, 4] if args.tiny else [10, 100, 1000]
    args.ks = [1, 3] if args.tiny else [1, 5, 50]
    if args.tiny:
        args.rounds, args.jac_rounds, args.min_time = 1, 1, 0.0
    t0 = time.time()
    data: dict = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads,
                  "load_start": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
                  "device": str(args.device), "tiny": args.tiny}
    if "jacobian" in args.only:
        data["jacobian"] = study_jacobian(args)
    if "forward" in args.only:
        data["forward"] = study_forward(args)
    data["seconds"] = time.time() - t0
    data["load"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    import platform

    data["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical "
                       f"CPUs, torch {torch.__version__}, {args.threads} thread(s)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forward_mode.json").write_text(json.dumps(data, indent=1))
    if "forward" in data:
        plot(data, args.out / "forward_mode.png")
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
