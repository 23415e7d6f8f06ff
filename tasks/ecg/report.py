"""The validation's outputs: the meta/plain PT time ratio and the results table (markdown +
JSON + AUROC plot) of ``python -m tasks ecg``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common import mean_std, write_json
from tasks.ecg.config import ECGConfig
from tasks.ecg.plots import plot_auroc
from tasks.ecg.synthetic import GROUPS, timing_morphology
from tasks.paired_table import seed_range
from tasks.results_table import markdown_table, plumbing_title
from tasks.tables import compare, fmt_paired, per_seed

if TYPE_CHECKING:
    from tasks.ecg.task import Task

__all__ = ["summarize", "METHODS", "BASELINES"]

BASELINES = ("no_pt", "simclr_nowarp", "simclr", "simclr_oracle")  # Δ: vs the strongest

METHODS = ("no_pt", "simclr_nowarp", "simclr", "simclr_oracle", "meta_simclr",
           "meta_simclr_partial")


def summarize(results: list[dict[str, Any]], task: Task, out: Path, argv: list[str],
              cfg: ECGConfig, ratio: dict[str, Any] | None, plumbing: bool = False
              ) -> dict[str, Any]:
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    ns = sorted({r["n_ft"] for r in results})
    table: dict[str, dict[int, tuple[float, float, int]]] = {}
    groups: dict[str, dict[int, Any]] = {}
    for m in methods:
        table[m], groups[m] = {}, {}
        for n in ns:
            rs = [r for r in results if r["method"] == m and r["n_ft"] == n]
            if not rs:
                continue
            table[m][n] = (*mean_std([r["test_auroc"] for r in rs]), len(rs))
            if task.group_test is not None:
                split = [timing_morphology(r["test_auroc_per_label"]) for r in rs]
                groups[m][n] = {k: mean_std([d[k] for d in split])
                                for k in ("timing", "morphology")}
    seen: dict[tuple[int, int], dict] = {}  # one entry per full-access Meta SimCLR pre-training
    for r in results:
        if r["method"] == "meta_simclr" and r.get("strengths"):
            seen[(r["n_ft"], r["seed"])] = r["strengths"]
    strengths = list(seen.values())
    vs = {n: compare(per_seed(results, lambda r: r["test_auroc"],
                              where=lambda r, n=n: r["n_ft"] == n), baselines=BASELINES)
          for n in ns}
    lines = [f"# ECG reproduction: {task.name}", "", "Command: `python -m tasks "
             + " ".join(argv) + "`", "",
             plumbing_title("Test macro AUROC (%), mean +- std over seeds (count):", plumbing),
             "", "| method | " + " | ".join(f"N={n}" for n in ns) + " |",
             "| --- |" + " --- |" * len(ns)]
    for m in methods:
        cells = [f"{100 * table[m][n][0]:.1f} +- {100 * table[m][n][1]:.1f} ({table[m][n][2]})"
                 if n in table[m] else "-" for n in ns]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Test macro AUROC (points), each method minus the strongest of "
              f"{', '.join(BASELINES)} at that N on the same seeds (FT seeds averaged): "
              "mean [95% t-CI] (n):", "", markdown_table(["method", *(f"N={n}" for n in ns)], [
                  [m, *("-" if m not in vs[n] else "baseline (strongest)" if vs[n][m]["baseline"]
                        else fmt_paired(vs[n][m].get("paired"), 100) for n in ns)]
                  for m in methods])]
    if task.group_test is not None:
        lines += ["", "Macro AUROC (%) over the timing labels / the morphology labels:", "",
                  "| method | " + " | ".join(f"N={n}" for n in ns) + " |",
                  "| --- |" + " --- |" * len(ns)]
        for m in methods:
            cells = [f"{100 * groups[m][n]['timing'][0]:.1f} / "
                     f"{100 * groups[m][n]['morphology'][0]:.1f}" if n in groups[m] else "-"
                     for n in ns]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    summary_strengths = None
    if strengths and all("by_group" in s for s in strengths):
        summary_strengths = {g: mean_std([s["by_group"][g] for s in strengths]) for g in GROUPS}
        lines += ["", f"Learned warp strength w(x; phi) on the test set by ground-truth group "
                  f"(initial {cfg.warp:g}), mean +- std over {len(strengths)} Meta SimCLR "
                  "pre-trainings:", ""]
        lines += [f"- {g}: {m:.2f} +- {s:.2f}" for g, (m, s) in summary_strengths.items()]
    split = task.group_test is not None  # timing/morphology labels exist only synthetically
    pairs = paired_differences(results, split_labels=split)
    if pairs:
        lines += ["", "Paired differences (points; per seed, then mean +- std), all labels"
                  + (" | timing labels | morphology labels:" if split else ":"), ""]
        for (a, b), by_n in pairs.items():
            for n, d in by_n.items():
                cells = [" / ".join(f"{100 * v:+.1f}" for v in d[k]) + " (" + " +- ".join(
                    f"{100 * v:.1f}" for v in mean_std(d[k])) + ")" for k in d]
                lines.append(f"- {a} - {b}, N={n}: " + " | ".join(cells))
    if ratio:
        sec = lambda xs: ", ".join(f"{v:.1f}" for v in xs)  # noqa: E731
        lines += ["", f"Meta/plain PT wall-time ratio ({ratio['outer']} outer iterations, "
                  f"P={ratio['P']}, K={ratio['K']}, {ratio['repeats']} interleaved repeats): "
                  f"{ratio['ratio']:.2f} (min; median {ratio['ratio_median']:.2f}, CPU "
                  f"{ratio['cpu_ratio']:.2f}; plain {sec(ratio['plain_seconds'])} s, meta "
                  f"{sec(ratio['meta_seconds'])} s)"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    summary = {"table": {m: {str(n): v for n, v in t.items()} for m, t in table.items()},
               "timing_morphology": {m: {str(n): v for n, v in t.items()}
                                     for m, t in groups.items()},
               "strengths_by_group": summary_strengths, "time_ratio": ratio,
               "paired": {f"{a}-{b}": {str(n): d for n, d in by_n.items()}
                          for (a, b), by_n in pairs.items()},
               "vs_strongest": {str(n): v for n, v in vs.items()}, "plumbing": plumbing,
               "config": asdict(cfg), "argv": argv, "task": task.name, "out": str(out)}
    write_json(out / "results.json", summary)
    seeds = sorted({int(r["seed"]) for r in results})
    if table:
        plot_auroc(table, out / "auroc_vs_nft.png",
                   title=plumbing_title(f"ECG ({task.name}): test macro AUROC,\nmean +- std "
                                        f"over seeds {seed_range(seeds)} (n = {len(seeds)})",
                                        plumbing))
    return summary


PAIRS = (("meta_simclr", "simclr"), ("meta_simclr", "no_pt"), ("meta_simclr", "simclr_nowarp"),
         ("simclr", "simclr_nowarp"), ("simclr_nowarp", "no_pt"), ("simclr_oracle", "simclr"),
         ("meta_simclr", "simclr_oracle"))


def paired_differences(results: list[dict[str, Any]], split_labels: bool = True
                       ) -> dict[tuple[str, str], dict[int, Any]]:
    """Per-seed differences of test AUROC (all labels, and with ``split_labels`` the synthetic
    timing / morphology labels) between methods run on the same D_FT (same N, PT seed and FT
    seed), for the pairs in ``PAIRS``. PTB-XL has no such split: ``split_labels=False``."""
    def split(r: dict[str, Any]) -> dict[str, float]:
        if not split_labels:
            return {"all": r["test_auroc"]}
        return {"all": r["test_auroc"], **timing_morphology(r["test_auroc_per_label"])}

    by_key = {(r["method"], r["n_ft"], r["seed"], r.get("ft_seed", 0)): split(r) for r in results}
    out: dict[tuple[str, str], dict[int, Any]] = {}
    for a, b in PAIRS:
        for (m, n, s, f), va in sorted(by_key.items(), key=lambda kv: kv[0][1:]):
            vb = by_key.get((b, n, s, f))
            if m != a or vb is None:
                continue
            d = out.setdefault((a, b), {}).setdefault(n, {k: [] for k in va})
            for k in va:
                d[k].append(va[k] - vb[k])
    return out
