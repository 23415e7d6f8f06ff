"""``python -m benchmarks.bilevel [--quick] [--seeds N] [--budget S] [--problems ...] [--out DIR]
[--device DEV] [--data-dir DIR] [--render]``: the offline BenchOpt bilevel benchmark.

Order: float64 agreement of the hypergradient across hypergrad / torchopt / higher / the dense
reference on every problem (the run stops if one differs by more than 1e-6), the warm-start
study, the data-cleaning references, then the timed runs; JSON, PNGs and a markdown report
are written to ``--out`` (default ``benchmarks/results/bilevel``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from . import check
from . import report as R
from .methods import hypergrad_methods
from .peers import peer_methods
from .problems import PROBLEMS, make_problem

OUT = Path(__file__).resolve().parents[1] / "results" / "bilevel"
QUICK_BUDGET = {
    "quadratic": 5.0,
    "ijcnn1": 1.5,
    "breast_cancer": 1.0,
    "covtype": 1.5,
    "datacleaning": 2.5,
}
FULL_BUDGET = {
    "quadratic": 20.0,
    "ijcnn1": 20.0,
    "breast_cancer": 5.0,
    "covtype": 10.0,
    "datacleaning": 20.0,
}
AGREEMENT_TOL = 1e-6


def size_of(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else ("quick" if args.quick else "full")


TAGS = {"full": "protocol", "quick": "quick", "tiny": "tiny"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bilevel", description=__doc__)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 seeds, ~1-2 s budgets, ijcnn1/quadratic at reduced n (< 10 min)",
    )
    ap.add_argument("--tiny", action="store_true", help="the smoke test's sizes (with --quick)")
    ap.add_argument("--seeds", type=int, default=None, help="runs per method (default 10; 2)")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of compute per run, all problems (default: per problem)",
    )
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    ap.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply the per-problem budgets (a reduced protocol: e.g. 0.25)",
    )
    ap.add_argument("--methods", nargs="+", default=None, help="subset of method names")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--data-dir",
        default=None,
        help="folder with the original ijcnn1/covtype (libsvm) and MNIST (idx) files",
    )
    ap.add_argument(
        "--warm-steps",
        type=int,
        default=None,
        help="outer steps of the warm-start study (default 200; quick 40)",
    )
    ap.add_argument("--evals", type=int, default=None, help="metric evaluations per run")
    ap.add_argument(
        "--part",
        default="",
        help="suffix of this process's JSON (split --problems over processes; --render merges)",
    )
    ap.add_argument(
        "--render",
        action="store_true",
        help="only redraw plots and report.md from the JSON in --out",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    seeds = args.seeds or (2 if args.quick else 10)
    methods = hypergrad_methods(args.quick) + peer_methods(args.quick)
    if args.methods:
        methods = [m for m in methods if m.name in args.methods]
    n_evals = args.evals or (8 if args.quick else 20)  # the quadratic's are free: 40
    result: dict = {
        "config": {
            "quick": args.quick,
            "size": size_of(args),
            "command": "python -m benchmarks.bilevel " + " ".join(sys.argv[1:]),
            "seeds": seeds,
            "device": args.device,
            "threads": args.threads,
            "budget": {},
            "evals": n_evals,
            "machine": platform.platform(),
            "torch": torch.__version__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        },
        "problems": {},
    }
    t_start = time.perf_counter()
    from .protocol import run_one

    for name in args.problems:
        kw = {"size": size_of(args), "data_dir": args.data_dir, "device": args.device}
        P, P64 = make_problem(name, **kw), make_problem(name, dtype=torch.float64, **kw)
        agree = check.agreement(P64)
        worst = max(agree[k] for k in ("hypergrad", "torchopt", "higher"))
        if not worst <= AGREEMENT_TOL:
            raise RuntimeError(f"{name}: hypergradients disagree before timing: {agree}")
        entry: dict = {
            "substitute": P.substitute,
            "n_inner": P.n_inner,
            "n_outer": P.n_outer,
            "dim_inner": P.theta0.numel(),
            "dim_outer": P.h0.numel(),
            "info": P.info,
            "agreement": agree,
            "methods": {},
        }
        if name in ("quadratic", "datacleaning", "covtype"):
            steps = args.warm_steps or (40 if args.quick else 200)
            ws = check.warm_start_study(P64, steps=steps)
            ws.pop("rows")
            entry["warm_start"] = ws
        if name == "datacleaning":
            entry["references"] = check.cleaning_references(P64)
        budget = (
            args.budget or args.budget_scale * (QUICK_BUDGET if args.quick else FULL_BUDGET)[name]
        )
        result["config"]["budget"][name] = budget
        runs = []
        bar = tqdm(total=seeds * len(methods), desc=name, leave=False)
        for seed in range(seeds):  # interleaved: every method once per seed
            for m in methods:
                bar.set_postfix_str(m.name)
                evals = max(n_evals, 40) if name == "quadratic" and not args.evals else n_evals
                runs.append(run_one(P, P64, m, seed, budget, evals))
                bar.update()
        bar.close()
        for m in methods:
            entry["methods"][m.name] = {
                "library": m.library,
                "config": m.describe(),
                "stochastic": m.stochastic,
            }
        entry["runs"] = runs
        result["problems"][name] = entry
        if getattr(args, "save_to", None) is not None:  # after every problem: a crash loses nothing
            result["config"]["wall_s"] = time.perf_counter() - t_start
            args.save_to.write_text(json.dumps(result))
    result["config"]["wall_s"] = time.perf_counter() - t_start
    return result


def targets(result: dict) -> list[str]:
    """The issue's targets, met or missed, with the measured numbers."""
    out = []
    P = result["problems"]
    if "quadratic" in P:
        runs = P["quadratic"]["runs"]
        m_hg, t_hg = R.best(runs, 1e-8, "hypergrad")
        m_to, t_to = R.best(runs, 1e-8, "torchopt")
        budget = result["config"]["budget"]["quadratic"]
        if math.isfinite(t_hg) and not math.isfinite(t_to):  # a lower bound: budget / t_hg
            ratio, how = budget / t_hg, f">= {budget / t_hg:.2f}x (torchopt: not within {budget} s)"
        else:
            ratio = t_to / t_hg if math.isfinite(t_hg) else float("nan")
            how = f"{ratio:.2f}x"
        ok = ratio >= 2.0
        out.append(
            f"- quadratic, ||grad h||^2 <= 1e-8: hypergrad best `{m_hg}` "
            f"{R.fmt_time(t_hg)} s, torchopt best `{m_to}` {R.fmt_time(t_to)} s "
            f"(median over seeds): {how}, target >= 2x **{'met' if ok else 'missed'}**"
        )
    if "datacleaning" in P:
        runs, ref = P["datacleaning"]["runs"], P["datacleaning"]["references"]
        te, au = R.final(runs, "test_error"), R.final(runs, "auroc")
        m = min(te, key=lambda k: te[k])
        gap = 100 * (te[m] - ref["clean_labels"])
        best_auc = max(au, key=lambda k: au[k])
        out.append(
            f"- data cleaning, test error: best `{m}` {100 * te[m]:.2f}% vs clean-label "
            f"model {100 * ref['clean_labels']:.2f}% (gap {gap:+.2f} points; oracle "
            f"weights {100 * ref['oracle_weights']:.2f}%), target <= 1 point "
            f"**{'met' if gap <= 1.0 else 'missed'}**"
        )
        out.append(
            f"- data cleaning, clean/corrupted AUROC: best `{best_auc}` "
            f"{au[best_auc]:.4f} (`{m}`: {au[m]:.4f}), target >= 0.98 "
            f"**{'met' if au[best_auc] >= 0.98 else 'missed'}**"
        )
    for name, e in P.items():
        if "warm_start" in e:
            w = e["warm_start"]
            out.append(
                f"- warm starts ({name}, {w['steps']} outer steps, equal hypergradient "
                f"error): cold {w['hvps_per_step_cold']:.2f} vs warm "
                f"{w['hvps_per_step_warm']:.2f} HVPs/step = {w['ratio']:.2f}x, target >= 5x "
                f"**{'met' if w['ratio'] >= 5 else 'missed'}**"
            )
    wall = result["config"]["wall_s"]
    label = "--quick" if result["config"]["quick"] else "this protocol"
    line = f"- run time of {label}: {wall / 60:.1f} min"
    if len(result["config"].get("part_wall_s", [])) > 1:
        parts = ", ".join(f"{w / 60:.1f}" for w in result["config"]["part_wall_s"])
        line += f" (concurrent parts: {parts} min)"
    if result["config"]["quick"]:
        line += f", target < 10 min **{'met' if wall < 600 else 'missed'}**"
    out.append(line)
    return out


def render(result: dict, out: Path) -> str:
    cfg = result["config"]
    tag = TAGS[cfg["size"]]
    lines = [
        f"# Offline bilevel benchmark ({tag})",
        "",
        f"seeds {cfg['seeds']}, budgets {cfg['budget']} s, device {cfg['device']}, "
        f"threads {cfg['threads']}, wall {cfg['wall_s'] / 60:.1f} min, {cfg['started']}",
        "",
        "## Targets",
        "",
        *targets(result),
        "",
    ]
    for name, e in result["problems"].items():
        png = R.plot_problem(f"{name}_{tag}", e["runs"], out)
        a = e["agreement"]
        lines += [
            f"## {name}",
            "",
            f"n_inner {e['n_inner']}, n_outer {e['n_outer']}, dim_inner {e['dim_inner']}, "
            f"dim_outer {e['dim_outer']}. "
            + (f"Substitute: {e['substitute']}." if e["substitute"] else "Original data."),
            "",
            f"float64 agreement with the dense hypergradient (relative): hypergrad "
            f"{a['hypergrad']:.1e}, torchopt {a['torchopt']:.1e}, higher "
            f"{a['higher']:.1e} ({a['higher_steps']} unrolled steps from theta*).",
            "",
        ]
        if "references" in e:
            r = e["references"]
            lines += [
                f"References (test error): clean labels {100 * r['clean_labels']:.2f}%, "
                f"oracle weights {100 * r['oracle_weights']:.2f}%, noisy labels with unit "
                f"weights {100 * r['noisy_unit_weights']:.2f}%; corrupted fraction "
                f"{r['corrupted_fraction']:.3f}.",
                "",
            ]
        lines += [
            "Median time (s) to reach ||grad h||^2 <= threshold (seeds that reached it):",
            "",
            *R.table(name, e["runs"], R.thresholds_for(name, e["runs"])),
            "",
            f"![{name}]({png.name})",
            "",
        ]
    text = "\n".join(lines)
    (out / f"report_{tag}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.quick = args.quick or args.tiny
    args.out.mkdir(parents=True, exist_ok=True)
    tag = TAGS[size_of(args)]
    if args.render:  # every part of this size (see --part), merged
        result = merge(
            [json.loads(p.read_text()) for p in sorted(args.out.glob(f"bilevel_{tag}*.json"))]
        )
    else:
        name = f"bilevel_{tag}" + (f"_{args.part}" if args.part else "") + ".json"
        args.save_to = args.out / name
        result = run(args)
        (args.out / name).write_text(json.dumps(result))
        if args.part:  # the report covers every part written so far
            result = merge(
                [json.loads(p.read_text()) for p in sorted(args.out.glob(f"bilevel_{tag}*.json"))]
            )
    print(render(result, args.out))


def merge(parts: list[dict]) -> dict:
    """One result from parts run as separate processes (``--part``): problems side by side,
    budgets merged, wall time the longest part's (they ran concurrently) and each part's."""
    if not parts:
        raise FileNotFoundError("no bilevel_*.json in --out: run the benchmark first")
    out = {"config": dict(parts[0]["config"]), "problems": {}}
    out["config"]["budget"] = {}
    out["config"]["part_wall_s"] = [p["config"]["wall_s"] for p in parts]
    out["config"]["wall_s"] = max(out["config"]["part_wall_s"])
    for p in parts:
        out["config"]["budget"].update(p["config"]["budget"])
        out["problems"].update(p["problems"])
    return out


if __name__ == "__main__":
    main()
