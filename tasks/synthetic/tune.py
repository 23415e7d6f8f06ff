"""Pick one setting on tuning seeds by a rule fixed in advance (issue 20).

    python -m tasks.synthetic.tune rotation --config smoke --seeds 100-109 \\
        --grid meta_lr=1,2 --out runs/synthetic/tuning_rotation \\
        --export tasks/synthetic/results/rotation_tuning.json

Runs ``python -m tasks synthetic <experiment>`` once per value of the ``--grid`` key (each in
``<out>/<key>=<value>``, resumable; ``--set`` passes further overrides to every run) and applies
the rule:

- rotation: the value with the lowest mean |phi - 90| of the run's first hypergradient
  (``ift``, the forward-mode tangent by default); every other hypergradient of the run
  (``also_ift``) is reported at each value but does not vote;
- noisy: the value with the highest mean clean / noisy mean-weight ratio of Meta-PT (the
  paper's target); AUROC is reported, not used.

Ties go to the first value listed. ``--export`` writes, per hypergradient (rotation) or metric
(noisy), a ``paired_spec`` of every value against the picked one, the rule and the pick.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tasks.cli import main as tasks_main
from tasks.common import write_json
from tasks.harness import read_json
from tasks.paired_table import paired_spec, seed_range

from .export import summary
from .precond import IFT_LABELS

__all__ = ["RULES", "pick", "main"]

RULES = {
    "rotation": "lowest mean |phi - 90| of the run's own hypergradient (config field ift: the "
    "forward-mode tangent; the also_ift one does not vote); ties: first value",
    "noisy": "highest mean clean / noisy mean weight of Meta-PT; ties: first value",
}


def pick(values: list[str], per_value: dict[str, dict[int, float]], lower: bool) -> str:
    """The value whose per-seed numbers have the best mean (ties: the first listed)."""
    means = [float(np.mean(list(per_value[v].values()))) for v in values]
    best = min(means) if lower else max(means)
    return values[means.index(best)]


def _tables(
    experiment: str, key: str, values: list[str], metrics: dict[str, dict[str, Any]]
) -> tuple[str, dict[str, Any]]:
    name = lambda v: f"{key}={v}"  # noqa: E731
    if experiment == "rotation":
        modes = metrics[values[0]].get("modes", [metrics[values[0]]["config"]["ift"]])

        def errs(v: str, m: str) -> dict[int, float]:
            mm = metrics[v].get("per_mode", {m: metrics[v]})[m]
            return dict(zip(mm["seeds"], mm["errors"]))

        best = pick(values, {v: errs(v, modes[0]) for v in values}, lower=True)
        specs = {
            IFT_LABELS[m]: paired_spec(
                "|phi - 90| (degrees)",
                {name(v): errs(v, m) for v in values},
                [name(best)],
                digits=2,
                higher_is_better=False,
                title=f"tuning, {IFT_LABELS[m]}",
            )
            for m in modes
        }
        return best, specs
    per = {v: dict(zip(metrics[v]["seeds"], metrics[v]["ratio"])) for v in values}
    best = pick(values, per, lower=False)
    auc = {v: dict(zip(metrics[v]["seeds"], metrics[v]["auroc"])) for v in values}
    specs = {
        "clean / noisy mean weight": paired_spec(
            "clean / noisy mean weight",
            {name(v): per[v] for v in values},
            [name(best)],
            digits=1,
            title="tuning, Meta-PT",
        ),
        "weight AUROC": paired_spec(
            "clean-vs-noisy weight AUROC",
            {name(v): auc[v] for v in values},
            [name(best)],
            digits=3,
            title="tuning, Meta-PT (not used by the rule)",
        ),
    }
    return best, specs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m tasks.synthetic.tune", description=__doc__.split("\n")[0]
    )
    p.add_argument("experiment", choices=sorted(RULES))
    p.add_argument("--config", default="paper")
    p.add_argument("--seeds", required=True, help="tuning seed ids, e.g. 100-109")
    p.add_argument("--grid", required=True, metavar="KEY=V1,V2,...")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--export", type=Path, default=None)
    a = p.parse_args(argv)
    key, sep, vals = a.grid.partition("=")
    values = [v for v in vals.split(",") if v]
    if not sep or not values:
        p.error(f"--grid must be KEY=V1,V2,..., got {a.grid!r}")
    metrics = {}
    for v in values:
        out = a.out / f"{key}={v}"
        cmd = [
            "synthetic",
            a.experiment,
            "--config",
            a.config,
            "--seeds",
            a.seeds,
            "--out",
            str(out),
            "--no-progress",
            "--set",
            f"{key}={v}",
            *(x for o in a.overrides for x in ("--set", o)),
        ]
        rc = tasks_main(cmd)
        if rc != 0:
            return rc
        metrics[v] = read_json(out / "metrics.json")
    best, specs = _tables(a.experiment, key, values, metrics)
    print(
        f"rule: {RULES[a.experiment]}\npicked on seeds {seed_range(metrics[best]['seeds'])}: "
        f"{key}={best}"
    )
    if a.export is not None:
        write_json(
            a.export,
            {
                "command": "python -m tasks.synthetic.tune " + shlex.join(argv),
                "experiment": a.experiment,
                "config_name": a.config,
                "seeds": metrics[best]["seeds"],
                "key": key,
                "values": values,
                "rule": RULES[a.experiment],
                "picked": best,
                "tables": specs,
                "summary": {k: summary(t) for k, t in specs.items()},
                "overrides": a.overrides,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
