"""One short run of every benchmark: a markdown table of ratios, two plots and the raw JSON.

    python -m benchmarks.report            # quick sizes, a few minutes on 2 shared CPU cores
    python -m benchmarks.report --full     # + the 1M MLP and the CNN in the IFT section, batch 512
    python -m benchmarks.report --results  # also rewrite benchmarks/RESULTS.md (+ results/)

Every time ratio is min/min over interleaved rounds (benchmarks/timing.py),
in one process with ``torch.set_num_threads(--threads)``. The unit is one gradient of the inner
loss w.r.t. params on the same problem. Peak memory is measured per configuration in a fresh
process (benchmarks/memory.py: rise of VmHWM after a clear_refs reset).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import hypergrad as hg

from . import first_order, memory, metapt, timing
from . import methods as M
from .problems import make_problem

HERE = Path(__file__).resolve().parent


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}f}"


class Report:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.rows: list[dict] = []
        self.data: dict = {"config": vars(args).copy()}
        self.tiny = args.tiny

    def name(self, n: str) -> str:
        from .problems import TINY

        return TINY.get(n, n) if self.tiny else n

    def row(self, group, problem, method, setting, t_grad=None, t_torchopt=None, t_higher=None,
            mem=None, target="", met="", note=""):
        self.rows.append(dict(group=group, problem=problem, method=method, setting=setting,
                              t_grad=t_grad, t_torchopt=t_torchopt, t_higher=t_higher, mem=mem,
                              target=target, met=met, note=note))

    def log(self, msg: str) -> None:
        if not self.a.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # ------------------------------------------------------------------------------ products
    def products(self) -> None:
        out = self.data.setdefault("products", {})
        for name in self.a.product_problems:
            P = make_problem(self.name(name), torch.float32, fit_steps=0 if name == "mlp1m"
                             else None)
            self.log(f"products on {name} ({P.n_params} params)")
            fns = {k: f(P) for k, f in M.PRODUCTS.items()}
            t = timing.interleaved(fns, rounds=self.a.rounds, min_time=self.a.min_time)
            r = {k: timing.ratio(t, k, "grad") for k in fns}
            out[name] = {"n_params": P.n_params, "grad_s": timing.median(t, "grad"), "ratio": r}
            mlp = name.startswith("mlp")
            m_ratio = r["matvec"]
            self.row("products", name, "make_hvp matvec", "reuses the first-order graph", m_ratio,
                     timing.ratio(t, "matvec", "func_vjp_matvec"),
                     target="<= 1.3" if mlp else "", met=_met(m_ratio <= 1.3) if mlp else "",
                     note="torchopt column: vs torch.func.vjp of torch.func.grad (custom_root's "
                     "product)")
            self.row("products", name, "hvp", "graph + 1 product", r["hvp"])
            self.row("products", name, "mixed_vjp", "graph + 1 product into hparams",
                     r["mixed_vjp"], note=f"on a built operator: {r['op_mixed']:.2f}")
            self.row("products", name, "forward-over-reverse", "torch.func.jvp(grad)",
                     r["fwd_over_rev"], note="not used by hypergrad")

    # ------------------------------------------------------------------------------ implicit
    def implicit(self) -> None:
        out = self.data.setdefault("implicit", {})
        for name in self.a.implicit_problems:
            P64 = make_problem(self.name(name), torch.float64)
            checks = {}
            for kind in ("cg", "neumann"):
                for J in self.a.js:
                    ours = M.hg_implicit(P64, kind, J + 1 if kind == "neumann" else J)()
                    err = M.rel_error(ours, M.torchopt_implicit(P64, kind, J)())
                    if err >= 1e-5:
                        raise AssertionError(f"{name} {kind} J={J}: libraries differ ({err:.2e})")
                    checks[f"{kind}-{J}"] = err
            P = make_problem(self.name(name), torch.float32)
            self.log(f"implicit on {name} (float64 agreement checked: max rel err "
                     f"{max(checks.values()):.1e})")
            parts = M.implicit_parts(P)
            tp = timing.interleaved(parts, rounds=self.a.rounds, min_time=self.a.min_time)
            comp = {k: timing.ratio(tp, k, "grad") for k in parts}
            res = {"agreement_f64": checks, "components": comp, "J": {}}
            res["cg_overhead_per_iteration"] = self.cg_overhead(P)
            oh = res["cg_overhead_per_iteration"]
            self.row("implicit", name, "cg vector work per iteration", "diagonal matvec",
                     oh["hg.cg"], target="")
            for J in self.a.js:
                fns = {"grad": M.grad(P),
                       "hg_cg": M.hg_implicit(P, "cg", J), "to_cg": M.torchopt_implicit(P, "cg", J),
                       "hg_ns": M.hg_implicit(P, "neumann", J),
                       "to_ns": M.torchopt_implicit(P, "neumann", J)}
                t = timing.interleaved(fns, rounds=self.a.irounds, min_time=self.a.min_time)
                r = {k: timing.ratio(t, k, "grad") for k in fns}
                vs = {k: timing.ratio(t, f"hg_{k}", f"to_{k}") for k in ("cg", "ns")}
                parts_sum = comp["graph"] + J * comp["matvec"] + comp["mixed"] + comp["outer"]
                res["J"][J] = {"ratio": r, "vs_torchopt": vs, "sum_of_parts": parts_sum}
                bound = 1.3 * (J + 4)
                self.row("implicit", name, "implicit_grad cg", f"J={J}", r["hg_cg"], vs["cg"],
                         target=f"<= {bound:.1f} x grad; <= 0.83 x torchopt",
                         met=f"{_met(r['hg_cg'] <= bound)}; {_met(vs['cg'] <= 1 / 1.2)}",
                         note=f"sum of parts {parts_sum:.1f}; torchopt {r['to_cg']:.1f} x grad")
                self.row("implicit", name, "implicit_grad neumann", f"J={J}", r["hg_ns"],
                         vs["ns"], note=f"torchopt {r['to_ns']:.1f} x grad")
            out[name] = res

    def cg_overhead(self, P) -> dict:
        """Time per CG iteration beyond the matvec (a cheap diagonal one), in gradients."""
        b = P.direction()
        g = torch.Generator().manual_seed(3)
        d = {k: torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5 for k, v in b.items()}

        def diag(v):
            return {k: d[k] * x for k, x in v.items()}

        n = 20
        fns = {"grad": M.grad(P), "diag": lambda: diag(b),
               "hg.cg": lambda: hg.cg(diag, b, maxiter=n, tol=0.0)}
        t = timing.interleaved(fns, rounds=self.a.rounds, min_time=self.a.min_time)
        unit, mv = min(t["grad"]), min(t["diag"])
        return {k: (min(t[k]) / n - mv) / unit for k in ("hg.cg",)}

    # ------------------------------------------------------------------------------ accuracy
    def accuracy(self) -> None:
        import torchopt

        out = self.data.setdefault("accuracy", {})
        for name in ("small-logreg", "small-mlp"):
            P64 = make_problem(self.name(name), torch.float64)
            ref = hg.testing.reference_implicit_grad(P64.inner_loss, P64.outer_loss,
                                                     P64.params, P64.hparams)
            for dtype in (torch.float32, torch.float64):
                P = make_problem(self.name(name), dtype)
                for tol in self.a.tols:
                    hg_fn = M.hg_implicit(P, "cg", 0, solver=functools.partial(
                        hg.cg, maxiter=2000, tol=tol))
                    to_fn = M.torchopt_implicit(P, "cg", 0, solve=torchopt.linear_solve.solve_cg(
                        maxiter=2000, rtol=tol))
                    nc_fn = M.torchopt_implicit(P, "cg", 0,
                                                solve=torchopt.linear_solve.solve_normal_cg(
                                                    maxiter=2000, rtol=tol))
                    e = {k: M.rel_error(f(), ref) for k, f in
                         (("hypergrad", hg_fn), ("torchopt", to_fn), ("normal_cg", nc_fn))}
                    dt = str(dtype)[6:]
                    out[f"{name} {dt} tol={tol:g}"] = e
                    better = e["hypergrad"] < 0.99 * e["torchopt"]
                    tie = abs(e["hypergrad"] - e["torchopt"]) <= 0.01 * e["torchopt"] + 1e-12
                    self.row("accuracy", name, "implicit_grad cg", f"{dt}, tol={tol:g}",
                             target="err < torchopt err",
                             met="yes" if better else ("tie" if tie else "**no**"),
                             note=f"rel err vs dense: hypergrad {e['hypergrad']:.1e}, torchopt "
                             f"solve_cg {e['torchopt']:.1e}, custom_root default solve_normal_cg "
                             f"{e['normal_cg']:.1e}")
        self.log("accuracy done")

    # ------------------------------------------------------------------------------ unroll
    def unroll(self) -> None:
        out = self.data.setdefault("unroll", {})
        P = make_problem(self.name("mlp100k"), torch.float32, batch=self.a.unroll_batch)
        P64 = make_problem(self.name("mlp100k"), torch.float64, batch=self.a.unroll_batch)
        for K in (None, 2):  # all libraries agree before anything is timed
            ref = M.hg_unroll(P64, 4, K)()
            for lib in ("higher", "torchopt"):
                err = M.rel_error(M.UNROLLS[lib](P64, 4, K)(), ref)
                if err >= 1e-10:
                    raise AssertionError(f"unroll: {lib} disagrees with hypergrad ({err:.1e})")
        for T in self.a.ts:
            c = math.ceil(math.sqrt(T))
            for K in [None, *[k for k in self.a.ks if k < T]]:
                fns = {"grad": M.grad(P)}
                fns.update({lib: f(P, T, K) for lib, f in M.UNROLLS.items()})
                if K is None:
                    fns["ckpt"] = M.hg_unroll(P, T, None, checkpoint_every=c)
                self.log(f"unroll T={T} K={K}")
                t = timing.interleaved(fns, rounds=self.a.urounds, min_time=self.a.min_time)
                r = {k: timing.ratio(t, k, "grad") for k in fns}
                key = f"T={T} " + ("full" if K is None else f"K={K}")
                out[key] = {"ratio": r, "vs_torchopt": timing.ratio(t, "hypergrad", "torchopt"),
                            "vs_higher": timing.ratio(t, "hypergrad", "higher")}
                self.row("unroll", f"mlp100k b{P.batch}", "unroll",
                         key, r["hypergrad"], out[key]["vs_torchopt"], out[key]["vs_higher"],
                         note=f"higher {r['higher']:.0f}, torchopt {r['torchopt']:.0f} x grad")
                if K is None:
                    out[key]["ckpt_vs_full"] = timing.ratio(t, "ckpt", "hypergrad")
                    self.row("unroll", f"mlp100k b{P.batch}", "unroll checkpointed",
                             f"T={T}, every {c}", r["ckpt"],
                             timing.ratio(t, "ckpt", "torchopt"), timing.ratio(t, "ckpt", "higher"),
                             target="time <= 2 x full unroll",
                             met=_met(out[key]["ckpt_vs_full"] <= 2.0),
                             note=f"{out[key]['ckpt_vs_full']:.2f} x the full unroll's time")

    # ------------------------------------------------------------------------------ memory
    def memory(self) -> None:
        prob, b = self.name("mlp100k"), self.a.unroll_batch
        ts, lo, hi = self.a.ts, min(self.a.ts), max(self.a.ts)
        k5 = min(5, lo - 1)
        ks = [k for k in self.a.ks if k < hi]
        cfgs = [dict(method="grad")]
        for T in ts:
            c = math.ceil(math.sqrt(T))
            cfgs += [dict(method="ift", T=T), dict(method="unroll", T=T),
                     dict(method="unroll", T=T, ckpt=c), dict(method="unroll", T=T, K=k5)]
            if not self.tiny and lo != T:
                cfgs += [dict(method="higher", T=T), dict(method="torchopt", T=T)]
        cfgs += [dict(method="unroll", T=hi, K=k) for k in ks if k != k5]
        if self.tiny:  # the smoke test: one process per kind of measurement is enough
            cfgs = [cfgs[0], dict(method="unroll", T=lo, ckpt=2)]
        self.log(f"memory: {len(cfgs)} fresh processes")

        def go(cfg):
            return memory.measure(problem=prob, batch=b, **cfg)

        with ThreadPoolExecutor(self.a.mem_workers) as ex:
            recs = list(ex.map(go, cfgs))
        self.data["memory"] = recs
        unit = max(recs[0]["peak_kib"], 4)  # a page: tiny problems allocate below resolution

        def mem(method, T, K=None, ckpt=None):
            for r in recs:
                if (r["method"], r["T"], r["K"], r["ckpt"]) == (method, T, K, ckpt):
                    return r["peak_kib"] / unit
            return None

        def growth(a, b2):
            return None if a is None or b2 is None or a <= 0 else b2 / a

        ift = [m for m in (mem("ift", T) for T in ts) if m]
        flat = max(ift) / min(ift) if len(ift) > 1 else None
        tr = growth(mem("unroll", lo, k5), mem("unroll", hi, k5))
        by_k = [mem("unroll", hi, k) for k in ks]
        grows_k = None not in by_k and all(x <= y for x, y in zip(by_k, by_k[1:]))
        full_g = growth(mem("unroll", lo), mem("unroll", hi))
        ck_g = growth(mem("unroll", lo, None, math.ceil(math.sqrt(lo))),
                      mem("unroll", hi, None, math.ceil(math.sqrt(hi))))
        where = f"mlp100k b{b}" if b else prob
        for T in ts:
            c, last = math.ceil(math.sqrt(T)), hi == T
            self.row("memory", where, "implicit_grad cg J=10", f"T={T}", mem=mem("ift", T),
                     target="flat in T" if last else "",
                     met=_met(flat is not None and flat <= 1.25) if last else "",
                     note=f"max/min over T = {_fmt(flat)}" if last else "")
            self.row("memory", where, "unroll full", f"T={T}", mem=mem("unroll", T),
                     t_torchopt=_div(mem("unroll", T), mem("torchopt", T)),
                     t_higher=_div(mem("unroll", T), mem("higher", T)),
                     note="torchopt/higher columns: memory ratios")
            self.row("memory", where, "unroll checkpointed", f"T={T}, every {c}",
                     mem=mem("unroll", T, None, c), target="sub-linear in T" if last else "",
                     met=_met(None not in (ck_g, full_g) and ck_g < 0.75 * full_g)
                     if last else "",
                     note=f"growth T={lo}->{hi}: {_fmt(ck_g, 1)}x vs full {_fmt(full_g, 1)}x"
                     if last else "")
            self.row("memory", where, f"unroll truncated K={k5}", f"T={T}",
                     mem=mem("unroll", T, k5), target="flat in T" if last else "",
                     met=_met(tr is not None and tr <= 1.25) if last else "",
                     note=f"T={lo}->{hi}: {_fmt(tr)}x" if last else "")
        for k in ks:
            if k == k5 and k != ks[-1]:
                continue  # already a row above
            self.row("memory", where, f"unroll truncated K={k}", f"T={hi}",
                     mem=mem("unroll", hi, k), target="grows with K" if k == ks[-1] else "",
                     met=_met(grows_k) if k == ks[-1] else "")

    # ------------------------------------------------------------------------------ output
    def table(self) -> str:
        head = ("| group | problem | method | setting | time / 1 grad | time / torchopt | "
                "time / higher | memory / 1 grad | target | met | note |")
        lines = [head, "|" + "---|" * 11]
        for r in self.rows:
            lines.append("| " + " | ".join([
                r["group"], r["problem"], r["method"], r["setting"], _fmt(r["t_grad"]),
                _fmt(r["t_torchopt"]), _fmt(r["t_higher"]), _fmt(r["mem"], 1), r["target"],
                r["met"], r["note"]]) + " |")
        return "\n".join(lines)

    def plots(self, out: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        paths = []
        imp = self.data.get("implicit", {})
        if imp:
            fig, axes = plt.subplots(1, len(imp), figsize=(5 * len(imp), 4), squeeze=False)
            for ax, (name, res) in zip(axes[0], imp.items()):
                js = sorted(res["J"], key=int)
                for key, label, style in (("hg_cg", "hypergrad cg", "o-"),
                                          ("to_cg", "torchopt solve_cg", "o--"),
                                          ("hg_ns", "hypergrad neumann", "s-"),
                                          ("to_ns", "torchopt solve_inv(ns)", "s--")):
                    ax.plot(js, [res["J"][j]["ratio"][key] for j in js], style, label=label)
                ax.plot(js, [1.3 * (j + 4) for j in js], "k:", label="target 1.3 (J + 4)")
                ax.set(title=name, xlabel="iterations J", ylabel="time / one gradient")
                ax.legend(fontsize=8)
            fig.tight_layout()
            paths.append(out / "time_vs_J.png")
            fig.savefig(paths[-1], dpi=90)
            plt.close(fig)
        recs = self.data.get("memory")
        if recs:
            fig, ax = plt.subplots(figsize=(6, 4.5))
            series = {}
            for r in recs[1:]:
                label = r["method"] if r["method"] != "unroll" else "hypergrad unroll"
                if r["method"] == "ift":
                    label = "hypergrad implicit_grad (cg, J=10)"
                if r["K"] is not None:
                    label += f" K={r['K']}"
                if r["ckpt"] is not None:
                    label += " checkpointed (every ceil(sqrt T))"
                series.setdefault(label, []).append((r["T"], r["peak_kib"] / 1024))
            for label, pts in series.items():
                if len(pts) > 1:
                    pts.sort()
                    ax.plot(*zip(*pts), "o-", label=label)
            ax.axhline(recs[0]["peak_kib"] / 1024, color="k", ls=":", label="one gradient")
            ax.set(xscale="log", yscale="log", xlabel="horizon T (inner steps)",
                   ylabel="peak memory rise (MiB)", title="peak memory vs T (fresh process each)")
            ax.legend(fontsize=7, loc="upper left")
            fig.tight_layout()
            paths.append(out / "memory_vs_T.png")
            fig.savefig(paths[-1], dpi=90)
            plt.close(fig)
        return paths


Report.first_order = first_order.section  # issue 16: FD vs exact products, SAMA, bf16 autocast


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _div(a, b):
    return None if a is None or b is None else a / b


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} intra-op thread(s)), "
            f"{platform.system()} {platform.release()}"
            + (f"; load average at the end {load[0]:.1f}" if load else ""))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="hypergrad benchmark report")
    ap.add_argument("--full", action="store_true", help="bigger sizes, more rounds")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--results", action="store_true", help="rewrite benchmarks/RESULTS.md")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--only", default="products,implicit,accuracy,unroll,memory,solvers")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite RESULTS.md from the table and JSON already in --out")
    a = ap.parse_args(argv)
    if a.render_only:
        render_results(a.out)
        return {}
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    if a.tiny:
        os.environ["HYPERGRAD_BENCH_SIZE"] = "tiny"
    a.product_problems = ["logreg", "mlp100k", "mlp1m", "cnn"]
    a.implicit_problems = ["logreg", "mlp100k"] + (["mlp1m", "cnn"] if a.full else [])
    a.js, a.tols = [5, 10, 20], [1e-3, 1e-6]
    a.ts, a.ks = [10, 50, 200], [1, 5, 20]
    a.unroll_batch = 512 if a.full else 128
    a.rounds, a.irounds, a.urounds = (15, 7, 5) if a.full else (7, 5, 3)
    a.min_time, a.mem_workers = 0.02, 2
    if a.tiny:
        a.product_problems = ["mlp100k"]
        a.implicit_problems = ["mlp100k"]
        a.js, a.tols, a.ts, a.ks = [2, 3], [1e-3], [3, 6], [2]
        a.rounds = a.irounds = a.urounds = 2
        a.min_time, a.unroll_batch = 0.0, None
    rep = Report(a)
    t0 = time.time()
    sections = a.only.split(",")
    for section in sections:
        if section != "solvers":
            getattr(rep, section)()
    if "solvers" in sections:  # error vs cost per solver (cond 1e4) and vmap vs loop
        import contextlib
        import io

        from benchmarks import solver_study

        buf = io.StringIO()
        a.out.mkdir(parents=True, exist_ok=True)
        study = ["--out", str(a.out), "--threads", str(a.threads)]
        with contextlib.redirect_stdout(buf):
            solver_study.main(study + (["--n", "30"] if a.tiny else []))
        (a.out / "solver_study.md").write_text(buf.getvalue())
    rep.data["rows"] = rep.rows
    rep.data["machine"] = machine()
    rep.data["seconds"] = time.time() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    table = rep.table()
    (a.out / "table.md").write_text(table + "\n")
    plots = rep.plots(a.out)
    (a.out / "results.json").write_text(json.dumps(rep.data, indent=1, default=str))
    print(table)
    print(f"\nmachine: {rep.data['machine']}\nwall time {rep.data['seconds']:.0f} s; "
          f"plots and JSON in {a.out}")
    if a.results:
        write_results(rep, table, plots)
    return rep.data


def write_results(rep: Report, table: str, plots: list[Path]) -> None:
    render_results(rep.a.out)


def render_results(out: Path) -> None:
    """Copy plots and JSON from ``out`` to benchmarks/results/ and fill RESULTS.template.md."""
    import shutil

    dest = HERE / "results"
    dest.mkdir(exist_ok=True)
    for name in ("time_vs_J.png", "memory_vs_T.png", "results.json", "solver_study.png",
                 "solver_study.json"):
        if (out / name).exists():
            shutil.copy(out / name, dest / name)
    data = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text().strip()
    text = (HERE / "RESULTS.template.md").read_text()
    study = out / "solver_study.md"
    solvers = study.read_text().strip() if study.exists() else "(not run: add `solvers` to --only)"
    from benchmarks import forward_mode
    dist = "\n\n".join(distributed_markdown(json.loads(f.read_text())) for f in
                       sorted(dest.glob("distributed_scaling_*.json"), reverse=True))
    dist = dist or "(not run: `python -m studies.distributed_scaling --config synthetic|paper`)"
    for key, val in (("TABLE", table), ("SOLVERS", solvers), ("DISTRIBUTED", dist),
                     ("FORWARD_MODE", forward_mode.section(dest)),
                     ("FIRST_ORDER", first_order.rendered(dest)),
                     ("MACHINE", data["machine"]),
                     ("DATE", time.strftime("%Y-%m-%d")), ("SECONDS", f"{data['seconds']:.0f}"),
                     ("MODE", "--full" if data["config"].get("full") else "quick")):
        text = text.replace("{{" + key + "}}", val)
    text = text.rstrip("\n") + "\n\n" + metapt.section(dest) + "\n"
    (HERE / "RESULTS.md").write_text(text)


def distributed_markdown(result: dict) -> str:
    """The table and summary line of one :func:`main` result (studies/distributed_scaling.py)."""
    rows = {(r["processes"], r["plain"]): r for r in result["rows"]}
    n = result["nproc"]
    many = rows[(n, False)]
    lines = [f"PPI synthetic task (config `{result['config']}`): GIN with {many['pt_params']} PT "
             f"parameters, {many['phi']} task weights, P = {many['P']}, PT batch "
             f"{many['batch_size']}, meta batch {many['meta_batch_size']} (global); load average "
             f"{result.get('load_average', float('nan')):.1f} on the 2-core machine", "",
             "| processes | s / outer iteration, Meta-PT | s / outer iteration, plain PT | "
             "all-reduce MiB / outer iteration / rank | all-reduce calls |",
             "|---|---|---|---|---|"]
    for w in (1, n):
        m, p = rows[(w, False)], rows[(w, True)]
        lines.append(f"| {w} | {m['seconds_per_meta_step']:.3f} | "
                     f"{p['seconds_per_meta_step']:.3f} | "
                     f"{m['allreduce_bytes_per_meta_step'] / 2**20:.2f} | "
                     f"{m['allreduce_calls_per_meta_step']:.0f} |")
    plain_mb = rows[(n, True)]["allreduce_bytes_per_meta_step"] / 2**20
    lines += ["", f"Meta-PT scaling efficiency with {n} processes: {result['efficiency']:.2f} "
              f"(speed-up {result['speedup']:.2f}x); "
              f"{many['allreduce_bytes_per_meta_step'] / 2**20:.2f} MiB all-reduced per outer "
              f"iteration per rank (plain PT: {plain_mb:.2f})."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
