"""First-order hypergradients: finite-difference (FD) products against exact ones.

    python -m benchmarks.first_order                 # MLP-100k, MLP-1M, transformer
    python -m benchmarks.first_order --tiny          # smoke sizes (seconds)
    python -m benchmarks.first_order --results       # + benchmarks/results/first_order.*

At equal solver iterations (CG, J = 10, tol 0) on the MLP-100k, the MLP-1M
(benchmarks/problems.py) and the tiny transformer of examples/transformer_reweighting.py (two
pre-norm blocks on ``F.scaled_dot_product_attention``; per-example weights and per-leaf weight
decays as hparams, 512 sequences, 20% noisy labels, weight decay 0.1, fitted by 300 L-BFGS steps
in float64 to a strict minimum):

* **accuracy**: the IFT hypergradient with FD products (default SDPA kernel) against the exact
  one in float64 (the transformer's exact one under ``sdpa_kernel(SDPBackend.MATH)``, the only
  CPU kernel with a double backward): cosine and relative error, for FD in float64 and float32;
* **time** (one process, interleaved rounds, min/min; benchmarks/timing.py): one FD product and
  one exact product (``make_hvp`` reusing its graph) in units of one gradient; the whole
  hypergradient exact vs FD at J = 10; the SAMA configuration (FD mixed product + ``hg.sama``
  with an Adam preconditioner, no solve) against exact CG J = 10;
* **peak memory** (fresh process per configuration, VmHWM after clear_refs as in
  benchmarks/memory.py): exact CG J = 10, FD CG J = 10 and SAMA, in units of one gradient;
* **low precision**: the hypergradient under ``torch.autocast(cpu, bfloat16)`` (bf16 forward,
  fp32 parameters, solver state and residuals) against float64, exact and FD, and plain float32;
* **SAMA bias**: cosine of the SAMA hypergradient with a 50-iteration exact CG one (float64).

The transformer's exact path runs under the MATH kernel (timed there too); its FD path runs on
the default kernel, which has no double backward.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import hypergrad as hg

from . import timing
from .memory import _reset_peak, _status_kib
from .problems import CACHE, BenchProblem, _fit, make_problem

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
J = 10
TARGETS = {
    "transformer_cos": 0.999, "transformer_rel": 1e-3, "mlp_f32_rel": 1e-2,
    "memory": 0.6, "fd_product": 2.2, "sama_time": 0.3, "auroc": 0.95,
}


# ------------------------------------------------------------------------------ problems
def transformer_problem(dtype: torch.dtype = torch.float32, *, tiny: bool = False,
                        fit_steps: int = 300, seed: int = 0,
                        weight_decay: float = 0.1) -> BenchProblem:
    """The demonstration's transformer as a benchmark problem (the structure of problems.py:
    hparams = per-leaf log weight decay + per-example logits, weights 2 sigmoid(logit)).

    Weight decay 0.1 makes the fitted point a strict minimum (gradient norm 0.05 after 300
    L-BFGS steps, Hessian eigenvalues ~0.25 to 5.6e3). With 1e-2 the fit stalls at gradient
    norm 0.9 on an indefinite Hessian, where CG is chaotic even with exact products: a 1e-9
    relative perturbation of ``b`` changes the J = 10 solution by 1.5e-5, so equal-iteration
    comparisons there measure CG, not the products."""
    sys.path.insert(0, str(ROOT))
    from examples.transformer_reweighting import TinyTransformer, corrupt, make_data

    n, dim, blocks = (32, 8, 1) if tiny else (512, 32, 2)
    g = torch.Generator().manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(seed)
        model = TinyTransformer(dim=dim, blocks=blocks).double()
    finally:
        torch.set_default_dtype(default)
    x_tr, y = make_data(n, generator=g)
    y_tr, _ = corrupt(y, 0.2, 4, generator=g)
    x_va, y_va = make_data(n, generator=g)
    names = [k for k, _ in model.named_parameters()]
    hparams = {"log_wd": torch.full((len(names),), float(torch.tensor(weight_decay).log()),
                                    dtype=torch.float64),
               "example_logits": 0.5 * torch.randn(n, generator=g, dtype=torch.float64)}

    def train_objective(out, leaves, h):
        ce = F.cross_entropy(out, y_tr, reduction="none")
        reg = sum(h["log_wd"].exp()[i] * (x**2).sum() for i, x in enumerate(leaves))
        return (2 * torch.sigmoid(h["example_logits"]) * ce).mean() + 0.5 * reg

    def inner_loss(p, h):
        return train_objective(torch.func.functional_call(model, p, (x_tr,)),
                               [p[k] for k in names], h)

    def outer_loss(p, h):
        return F.cross_entropy(torch.func.functional_call(model, p, (x_va,)), y_va)

    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    key = f"transformer-{seed}-{n}-{dim}-{blocks}-{fit_steps}-{weight_decay}-{torch.__version__}"
    path = CACHE / f"transformer-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    if path.exists():
        params = torch.load(path)
    else:
        with sdpa_kernel(SDPBackend.MATH):  # the fit is first-order; MATH for determinism
            params = _fit(inner_loss, params0, hparams, fit_steps)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(params, path)
    model = model.to(dtype)
    cast = {k: v.to(dtype) for k, v in hparams.items()}
    return BenchProblem(
        name="transformer-tiny" if tiny else "transformer",
        params={k: v.to(dtype) for k, v in params.items()}, hparams=cast,
        inner_loss=inner_loss, outer_loss=outer_loss, dtype=dtype,
        n_params=sum(v.numel() for v in params.values()), batch=n, model=model,
        init={k: v.to(dtype) for k, v in params0.items()},
        data=dict(x_tr=x_tr, y_tr=y_tr, x_va=x_va, y_va=y_va), train_objective=train_objective)


def get_problem(name: str, dtype: torch.dtype, tiny: bool) -> BenchProblem:
    if name == "transformer":
        return transformer_problem(dtype, tiny=tiny)
    return make_problem({"mlp100k": "mlp-tiny", "mlp1m": "mlp-tiny"}[name] if tiny else name,
                        dtype)


def exact_context(P: BenchProblem):
    """The exact path of the transformer needs the MATH kernel (the only one with a double
    backward on CPU); the MLPs need nothing."""
    return sdpa_kernel(SDPBackend.MATH) if P.name.startswith("transformer") else (
        contextlib.nullcontext())


# ------------------------------------------------------------------------------ methods
def ift(P: BenchProblem, products: str, solver) -> dict:
    """``implicit_grad`` with the given products (the same code for both paths)."""
    ctx = exact_context(P) if products == "exact" else contextlib.nullcontext()
    with ctx:
        return hg.implicit_grad(P.inner_loss, P.outer_loss, P.params, P.hparams, solver=solver,
                                products=products, stationarity_tol=None, on_failure="ignore")


def adam_diagonal(P: BenchProblem, steps: int = 20, lr: float = 1e-3) -> dict:
    """``hg.adam_preconditioner`` after ``steps`` Adam steps on the inner loss from the
    optimum (the state an online inner loop would carry)."""
    p = P.fresh_params(True)
    opt = torch.optim.Adam(p.values(), lr=lr)
    h = P.fresh_hparams()
    for _ in range(steps):
        opt.zero_grad()
        P.inner_loss(p, h).backward()
        opt.step()
    return hg.adam_preconditioner(opt, p)


def sama_solver(P: BenchProblem, lr: float = 1e-3):
    return functools.partial(hg.sama, alpha=lr, preconditioner=adam_diagonal(P, lr=lr))


def callables(P: BenchProblem) -> dict:
    """Zero-argument callables to time, all on ``P`` (float32)."""
    v = P.direction()
    p, h = P.fresh_params(True), P.fresh_hparams()
    leaves = list(p.values())

    def grad():
        return torch.autograd.grad(P.inner_loss(p, h), leaves)

    with exact_context(P):
        exact_op = hg.HessianOperator(P.inner_loss, P.params, P.hparams, ())
    fd_op = hg.FiniteDifferenceOperator(P.inner_loss, P.params, P.hparams, ())
    cg = functools.partial(hg.cg, maxiter=J, tol=0.0)
    sama = sama_solver(P)

    def in_exact(fn):
        def run():
            with exact_context(P):
                return fn()
        return run

    fns = {
        "grad": grad,
        "exact_product": in_exact(lambda: exact_op(v)),
        "fd_product": lambda: fd_op(v),
        "exact_cg": lambda: ift(P, "exact", cg),
        "fd_cg": lambda: ift(P, "finite_difference", cg),
        "sama": lambda: ift(P, "finite_difference", sama),
    }
    if P.name.startswith("transformer"):
        fns["grad_math"] = in_exact(grad)
    return fns


# ------------------------------------------------------------------------------ sections
def _cos_rel(a: dict, b: dict) -> tuple[float, float]:
    x, _ = hg.tree.ravel(hg.tree.map(lambda t: t.double(), a))
    y, _ = hg.tree.ravel(hg.tree.map(lambda t: t.double(), b))
    return float(x @ y / (x.norm() * y.norm())), float((x - y).norm() / y.norm())


def accuracy(name: str, tiny: bool) -> dict:
    P64 = get_problem(name, torch.float64, tiny)
    P32 = get_problem(name, torch.float32, tiny)
    cg = functools.partial(hg.cg, maxiter=J, tol=0.0)
    ref = ift(P64, "exact", cg)
    out = {}
    for label, P, products in (("fd_float64", P64, "finite_difference"),
                               ("fd_float32", P32, "finite_difference"),
                               ("exact_float32", P32, "exact")):
        cos, rel = _cos_rel(ift(P, products, cg), ref)
        out[label] = {"cos": cos, "rel": rel}
    for label, ctx in (("bf16_autocast_fd", "finite_difference"), ("bf16_autocast_exact", "exact")):
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = ift(P32, ctx, cg)
            cos, rel = _cos_rel(got, ref)
            out[label] = {"cos": cos, "rel": rel}
        except RuntimeError as e:  # report, don't hide
            out[label] = {"error": str(e).splitlines()[0][:200]}
    # SAMA's bias: against a (nearly) converged exact solve, float64
    long = ift(P64, "exact", functools.partial(hg.cg, maxiter=50, tol=1e-10))
    out["sama_vs_cg50"] = dict(zip(("cos", "rel"), _cos_rel(
        ift(P64, "finite_difference", sama_solver(P64)), long)))
    out["cg10_vs_cg50"] = dict(zip(("cos", "rel"), _cos_rel(ref, long)))
    return out


def times(name: str, tiny: bool, rounds: int, min_time: float) -> dict:
    P = get_problem(name, torch.float32, tiny)
    fns = callables(P)
    t = timing.interleaved(fns, rounds=rounds, min_time=min_time)
    unit = "grad"
    r = {k: timing.ratio(t, k, unit) for k in fns}
    r["fd_product_paired"] = timing.paired_ratio(t, "fd_product", unit)
    r["fd_cg_vs_exact_cg"] = timing.ratio(t, "fd_cg", "exact_cg")
    r["sama_vs_exact_cg"] = timing.ratio(t, "sama", "exact_cg")
    if "grad_math" in fns:
        r["exact_product_per_math_grad"] = timing.ratio(t, "exact_product", "grad_math")
    r["grad_seconds"] = min(t["grad"])
    return {"n_params": P.n_params, "ratio": r}


def child(method: str, name: str, tiny: bool) -> dict:
    """One configuration, measured in this (fresh) process: rise of VmHWM after clear_refs."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    P = get_problem(name, torch.float32, tiny)
    fn = callables(P)[method]
    fn()  # warm-up: lazy initialisation, code pages
    gc.collect()
    reset = _reset_peak()
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"method": method, "problem": name, "peak_kib": peak - before if reset else None,
            "seconds": seconds}


def memory(name: str, tiny: bool) -> dict:
    out = {}
    for method in ("grad", "exact_cg", "fd_cg", "sama"):
        cmd = [sys.executable, "-m", "benchmarks.first_order", "--child", method,
               "--problem", name] + (["--tiny"] if tiny else [])
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=1800)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        out[method] = json.loads(res.stdout.strip().splitlines()[-1])["peak_kib"]
    unit = max(out["grad"], 4)
    out["ratio"] = {k: out[k] / unit for k in ("exact_cg", "fd_cg", "sama")}
    out["fd_vs_exact"] = out["fd_cg"] / max(out["exact_cg"], 4)
    return out


def demonstration(tiny: bool) -> dict:
    """examples/transformer_reweighting.py with the SAMA configuration and with CG."""
    sys.path.insert(0, str(ROOT))
    from examples import transformer_reweighting as demo

    out = {}
    for solver in ("sama", "cg"):
        r = demo.main(["--solver", solver, "--quiet", "--out",
                       str(ROOT / "runs" / "examples" / "transformer_reweighting")]
                      + (["--tiny"] if tiny else []))
        out[solver] = {k: r[k] for k in ("auroc", "seconds", "mean_weight_clean",
                                         "mean_weight_noisy")}
    return out


# ------------------------------------------------------------------------------ report
def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def markdown(data: dict) -> str:
    lines = [
        "| problem | params | FD product / grad | exact product / grad | FD CG J=10 / exact CG "
        "J=10 (time) | SAMA / exact CG J=10 (time) | memory FD / exact (J=10) | memory / grad: "
        "exact, FD, SAMA | FD f64: cos, rel err | FD f32: cos, rel err | exact f32 rel err |",
        "|" + "---|" * 11,
    ]
    for name, d in data["problems"].items():
        t, a, m = d["time"]["ratio"], d["accuracy"], d.get("memory")
        exact_p = (f"{t['exact_product']:.2f} (MATH; {t['exact_product_per_math_grad']:.2f} x a "
                   f"MATH grad)" if "exact_product_per_math_grad" in t
                   else f"{t['exact_product']:.2f}")
        mem = (f"{m['fd_vs_exact']:.2f}", f"{m['ratio']['exact_cg']:.1f}, {m['ratio']['fd_cg']:.1f}"
               f", {m['ratio']['sama']:.1f}") if m else ("-", "-")
        lines.append(
            f"| {name} | {d['time']['n_params']:,} | {t['fd_product']:.2f} (paired median "
            f"{t.get('fd_product_paired', float('nan')):.2f}) | {exact_p} | "
            f"{t['fd_cg_vs_exact_cg']:.2f} | {t['sama_vs_exact_cg']:.2f} | {mem[0]} | {mem[1]} | "
            f"{a['fd_float64']['cos']:.7f}, {a['fd_float64']['rel']:.1e} | "
            f"{a['fd_float32']['cos']:.5f}, {a['fd_float32']['rel']:.1e} | "
            f"{a['exact_float32']['rel']:.1e} |")
    load = data.get("load_average_after_timing")
    if load:
        lines += ["", "Load average (1 min) right after each problem's timing: "
                  + ", ".join(f"{x:.1f}" for x in load) + " (2 cores, shared)."]
    lines += ["", "Low precision (bf16 autocast forward, fp32 parameters and solver state; "
              "hypergradient vs exact float64, CG J = 10) and SAMA's bias (float64, vs exact CG "
              "J = 50):", "",
              "| problem | float32 exact | float32 FD | bf16 autocast exact | bf16 autocast FD | "
              "SAMA vs CG-50: cos | exact CG-10 vs CG-50: cos |", "|" + "---|" * 7]

    def cell(x):
        return x["error"][:60] if "error" in x else f"cos {x['cos']:.4f}, rel {x['rel']:.1e}"

    for name, d in data["problems"].items():
        a = d["accuracy"]
        lines.append(f"| {name} | {cell(a['exact_float32'])} | {cell(a['fd_float32'])} | "
                     f"{cell(a['bf16_autocast_exact'])} | {cell(a['bf16_autocast_fd'])} | "
                     f"{a['sama_vs_cg50']['cos']:.3f} | {a['cg10_vs_cg50']['cos']:.3f} |")
    lines += ["", "Targets (issue 16):", ""]
    for text, ok in targets(data):
        lines.append(f"* {text}: {_met(ok)}")
    return "\n".join(lines)


def targets(data: dict) -> list[tuple[str, bool]]:
    T, out = TARGETS, []
    probs = data["problems"]
    tr = probs.get("transformer")
    if tr:
        a = tr["accuracy"]["fd_float64"]
        out.append((f"transformer FD (default kernel, float64) vs exact (MATH, float64): cos "
                    f"{a['cos']:.7f} (>= {T['transformer_cos']}), rel err {a['rel']:.1e} (<= "
                    f"{T['transformer_rel']:g})",
                    a["cos"] >= T["transformer_cos"] and a["rel"] <= T["transformer_rel"]))
        a = tr["accuracy"]["fd_float32"]
        out.append((f"transformer FD in float32 (not a target; context): cos {a['cos']:.5f}, rel "
                    f"err {a['rel']:.1e}", a["cos"] >= T["transformer_cos"]
                    and a["rel"] <= T["transformer_rel"]))
    for name in ("mlp100k", "mlp1m"):
        if name in probs:
            a = probs[name]["accuracy"]["fd_float32"]
            out.append((f"{name} FD float32 rel err {a['rel']:.1e} (<= {T['mlp_f32_rel']:g})",
                        a["rel"] <= T["mlp_f32_rel"]))
    for name, d in probs.items():
        m = d.get("memory")
        if m:
            out.append((f"{name} peak memory FD / exact at J = 10: {m['fd_vs_exact']:.2f} (<= "
                        f"{T['memory']})", m["fd_vs_exact"] <= T["memory"]))
        r = d["time"]["ratio"]
        out.append((f"{name} FD product / one gradient: {r['fd_product']:.2f} min/min, "
                    f"{r.get('fd_product_paired', float('nan')):.2f} paired median (<= "
                    f"{T['fd_product']}); FD CG J=10 takes {r['fd_cg_vs_exact_cg']:.2f}x the "
                    "exact CG's time", r["fd_product"] <= T["fd_product"]))
        out.append((f"{name} SAMA configuration / exact CG J=10 (time): "
                    f"{r['sama_vs_exact_cg']:.2f} (<= {T['sama_time']})",
                    r["sama_vs_exact_cg"] <= T["sama_time"]))
    demo = data.get("demonstration")
    if demo:
        out.append((f"demonstration AUROC with the SAMA configuration: {demo['sama']['auroc']:.3f}"
                    f" (>= {T['auroc']}); with CG J=10: {demo['cg']['auroc']:.3f}",
                    demo["sama"]["auroc"] >= T["auroc"]))
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["problems"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = range(len(names))
    w = 0.25
    ax = axes[0]
    for i, (key, label) in enumerate((("exact_cg", "exact CG J=10"), ("fd_cg", "FD CG J=10"),
                                      ("sama", "SAMA (FD mixed + Adam identity)"))):
        ax.bar([j + (i - 1) * w for j in x],
               [data["problems"][n]["time"]["ratio"][key] for n in names], w, label=label)
    ax.set(xticks=list(x), xticklabels=names, ylabel="time / one gradient",
           title="hypergradient time (1 thread)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, (key, label) in enumerate((("exact_cg", "exact CG J=10"), ("fd_cg", "FD CG J=10"),
                                      ("sama", "SAMA"))):
        ax.bar([j + (i - 1) * w for j in x],
               [(data["problems"][n].get("memory") or {"ratio": {key: 0}})["ratio"][key]
                for n in names], w, label=label)
    ax.set(xticks=list(x), xticklabels=names, ylabel="peak memory / one gradient",
           title="peak memory (fresh process each)")
    ax.legend(fontsize=8)
    ax = axes[2]
    keys = [("fd_float64", "FD float64"), ("fd_float32", "FD float32"),
            ("exact_float32", "exact float32"), ("bf16_autocast_fd", "FD bf16 autocast"),
            ("bf16_autocast_exact", "exact bf16 autocast")]
    w2 = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        vals = [data["problems"][n]["accuracy"][key].get("rel", float("nan")) for n in names]
        ax.bar([j + (i - len(keys) / 2 + 0.5) * w2 for j in x], vals, w2, label=label)
    ax.set(xticks=list(x), xticklabels=names, yscale="log",
           ylabel="rel. error vs exact float64 (CG J=10)", title="hypergradient error")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(problems: list[str], *, tiny: bool = False, rounds: int = 5, min_time: float = 0.05,
        with_memory: bool = True, with_demo: bool = True, log=print,
        only: tuple[str, ...] = ("accuracy", "time", "memory", "demonstration"),
        previous: dict | None = None) -> dict:
    """Every section in ``only`` for every problem; the others are taken from ``previous``
    (a JSON written by an earlier run) when given."""
    data: dict = {"problems": {}, "J": J, "targets": TARGETS}
    old = (previous or {}).get("problems", {})
    load = []
    for name in problems:
        d = dict(old.get(name, {}))
        if "accuracy" in only or "accuracy" not in d:
            log(f"first_order: {name} accuracy")
            d["accuracy"] = accuracy(name, tiny)
        if "time" in only or "time" not in d:
            log(f"first_order: {name} time")
            d["time"] = times(name, tiny, rounds, min_time)
            load.append(os.getloadavg()[0])
        if with_memory and ("memory" in only or "memory" not in d):
            log(f"first_order: {name} memory (fresh processes)")
            d["memory"] = memory(name, tiny)
        data["problems"][name] = d
    if with_demo and ("demonstration" in only or "demonstration" not in (previous or {})):
        log("first_order: demonstration")
        data["demonstration"] = demonstration(tiny)
    elif with_demo:
        data["demonstration"] = previous["demonstration"]
    data["load_average_after_timing"] = load or (previous or {}).get("load_average_after_timing")
    return data


def section(rep) -> None:
    """The report's ``first_order`` section (``python -m benchmarks.report --only ...``)."""
    names = ["mlp100k", "transformer"]
    data = run(names, tiny=rep.tiny, rounds=2 if rep.tiny else 3,
               min_time=0.0 if rep.tiny else 0.05, with_memory=True, with_demo=False,
               log=rep.log)
    rep.data["first_order"] = data
    for name, d in data["problems"].items():
        r, a, m = d["time"]["ratio"], d["accuracy"], d["memory"]
        rep.row("first_order", name, "FD product", "2 gradients, no double backward",
                r["fd_product"], target="<= 2.2", met=_met(r["fd_product"] <= 2.2),
                note=f"exact product {r['exact_product']:.2f}")
        rep.row("first_order", name, "implicit_grad FD cg", f"J={J}", r["fd_cg"],
                mem=m["ratio"]["fd_cg"], target="memory <= 0.6 x exact",
                met=_met(m["fd_vs_exact"] <= 0.6),
                note=f"{r['fd_cg_vs_exact_cg']:.2f} x exact time; memory {m['fd_vs_exact']:.2f} x "
                f"exact; FD f64 rel err {a['fd_float64']['rel']:.1e}, f32 "
                f"{a['fd_float32']['rel']:.1e}")
        rep.row("first_order", name, "SAMA (FD mixed + hg.sama)", "no solve", r["sama"],
                mem=m["ratio"]["sama"], target="<= 0.3 x exact cg J=10",
                met=_met(r["sama_vs_exact_cg"] <= 0.3),
                note=f"{r['sama_vs_exact_cg']:.2f} x exact cg; cos vs CG-50 "
                f"{a['sama_vs_cg50']['cos']:.3f}")


def rendered(results: Path = HERE / "results") -> str:
    """The RESULTS.md section: results/first_order.md as written by ``--results``."""
    path = results / "first_order.md"
    return path.read_text().strip() if path.exists() else (
        "(not run: `python -m benchmarks.first_order --results`)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="mlp100k,mlp1m,transformer")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--only", default="accuracy,time,memory,demonstration",
                    help="sections to (re)measure; the others come from --merge")
    ap.add_argument("--merge", type=Path, default=None,
                    help="a first_order.json from an earlier run to take the other sections from")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--results", action="store_true",
                    help="copy JSON/PNG to benchmarks/results/ and print the RESULTS.md section")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--problem", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if a.child:
        rec = child(a.child, a.problem, a.tiny)
        print(json.dumps(rec))
        return rec
    t0 = time.time()
    data = run(a.problems.split(","), tiny=a.tiny, rounds=2 if a.tiny else a.rounds,
               min_time=0.0 if a.tiny else 0.3, with_memory=not a.no_memory,
               with_demo=not a.no_demo, only=tuple(a.only.split(",")),
               previous=json.loads(a.merge.read_text()) if a.merge else None)
    data["seconds"] = time.time() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "first_order.json").write_text(json.dumps(data, indent=1, default=str))
    text = markdown(data)
    (a.out / "first_order.md").write_text(text + "\n")
    if not a.no_memory:
        plot(data, a.out / "first_order.png")
    print(text)
    if a.results:
        dest = HERE / "results"
        dest.mkdir(exist_ok=True)
        for f in ("first_order.json", "first_order.png", "first_order.md"):
            if (a.out / f).exists():
                (dest / f).write_bytes((a.out / f).read_bytes())
    return data


if __name__ == "__main__":
    main()
