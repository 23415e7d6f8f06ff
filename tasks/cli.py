"""The one command line of the reproductions, and the interface every task implements.

    python -m tasks <task> [<experiment>] [--config NAME] [--seeds N | 0,3,5 | 10-19]
        [--out DIR] [--set key=value ...] [--device cpu|cuda|auto] [--fresh] [task options]

``--seeds N`` means seeds 0..N-1 in every task; ids (``0,3,5``, ``10-19``) pick others.
``python -m tasks <task> [<experiment>] --help`` lists the configs, the methods and every
``--set`` key with its default. A run validates everything (overrides, seeds, ``--out``, the
recorded settings, the task's data) before it writes its first file; every mistake is one line
on stderr and exit status 2.

A task is an :class:`Experiment` (one per experiment of the task) in ``tasks/<task>/cli.py``'s
``EXPERIMENTS``: its configs and methods, its extra options, what the settings guard records,
and ``run(job) -> metrics`` plus ``summary(metrics) -> str``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import hypergrad as hg
from tasks.common import launch_rank
from tasks.harness import (
    CLIError,
    apply_overrides,
    check_out,
    check_settings,
    override_keys,
    parse_seeds,
    record_settings,
    resolve_device,
)

__all__ = ["Experiment", "Job", "main", "TASKS"]

TASKS = ("synthetic", "ppi", "ecg")


@dataclass
class Job:
    """One validated invocation: what ``Experiment.run`` gets."""

    args: argparse.Namespace
    cfg: Any
    seeds: list[int]
    out: Path
    device: torch.device
    progress: bool
    argv: list[str]


@dataclass
class Experiment:
    """What a task provides to the CLI (see the module docstring)."""

    task: str
    name: str  # the experiment ("rotation") or the task itself when it has one experiment
    description: str
    configs: dict[str, Any]
    default_config: str
    run: Callable[[Job], dict[str, Any]]
    summary: Callable[[dict[str, Any]], str]
    methods: tuple[str, ...] = ()
    default_seeds: str | dict[str, str] = "3"  # or per config
    runs_glob: str | tuple[str, ...] = ("runs/*.json", "ckpt/*")  # results and checkpoints
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    prepare: Callable[[Job], None] | None = None  # more checks (data dir, methods), no writes
    settings: Callable[[Job], dict[str, Any]] | None = None  # beyond the config
    default_out: Callable[[str], str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, no usage block
        raise CLIError(f"{self.prog}: {message}")


def _help_epilog(exp: Experiment) -> str:
    lines = [f"configs: {', '.join(exp.configs)} (default {exp.default_config})"]
    if exp.methods:
        lines.append(f"methods: {', '.join(exp.methods)}")
    lines.append(f"--set keys (defaults of config {exp.default_config!r}):")
    for k, v in override_keys(exp.configs[exp.default_config]).items():
        lines.append(f"  {k}={v}")
    return "\n".join(lines)


def build_parser(exp: Experiment, multi: bool) -> argparse.ArgumentParser:
    prog = f"python -m tasks {exp.task}" + (f" {exp.name}" if multi else "")
    p = _Parser(prog=prog, description=exp.description, epilog=_help_epilog(exp),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=exp.default_config, choices=list(exp.configs))
    seeds = exp.default_seeds
    if isinstance(seeds, dict):
        seeds = ", ".join(f"{v} for {k}" for k, v in seeds.items())
    p.add_argument("--seeds", default=None, help="a count N (seeds 0..N-1) or ids: 0,3,5 or "
                   f"10-19 (default {seeds})")
    p.add_argument("--out", type=Path, default=None, help="output folder (resumable: a rerun "
                   "reuses what finished)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable; keys below)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if exp.add_arguments is not None:
        exp.add_arguments(p)
    return p


def _experiments(task: str) -> dict[str, Experiment]:
    return importlib.import_module(f"tasks.{task}.cli").EXPERIMENTS


def _usage() -> str:
    return (f"usage: python -m tasks {{{','.join(TASKS)}}} [experiment] [options]; "
            "python -m tasks TASK --help lists them")


def prepare(argv: list[str]) -> tuple[Experiment, Job]:
    """Parse and validate everything; write nothing."""
    if not argv or argv[0] not in TASKS:
        raise CLIError(f"unknown task {argv[0]!r}; " + _usage() if argv else _usage())
    task, rest = argv[0], argv[1:]
    exps = _experiments(task)
    multi = len(exps) > 1
    if multi:
        if not rest or rest[0] in ("-h", "--help"):
            names = ", ".join(exps)
            if rest:
                print(f"usage: python -m tasks {task} {{{names}}} [options] (then --help)")
                raise SystemExit(0)
            raise CLIError(f"python -m tasks {task}: name an experiment: {names}")
        if rest[0] not in exps:
            raise CLIError(f"python -m tasks {task}: unknown experiment {rest[0]!r}; choose "
                           f"from {', '.join(exps)}")
        exp, rest = exps[rest[0]], rest[1:]
    else:
        exp = next(iter(exps.values()))
    args = build_parser(exp, multi).parse_args(rest)
    if args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    cfg = apply_overrides(exp.configs[args.config], args.overrides)
    default = exp.default_seeds
    if isinstance(default, dict):
        default = default[args.config]
    seeds = parse_seeds(args.seeds if args.seeds is not None else default)
    out = args.out
    if out is None:
        out = Path(exp.default_out(args.config) if exp.default_out else
                   f"runs/{exp.name}" + ("" if args.config == "paper" else f"_{args.config}"))
    check_out(out)
    job = Job(args, cfg, seeds, Path(out), resolve_device(args.device), not args.no_progress,
              list(argv))
    if exp.prepare is not None:
        exp.prepare(job)
    _, world = launch_rank()
    if args.fresh and world > 1:
        raise CLIError("--fresh under torchrun would let ranks delete each other's files; "
                       "delete --out before launching instead")
    if not args.fresh:
        check_settings(job.out, _settings(exp, job), exp.runs_glob)
    return exp, job


def _settings(exp: Experiment, job: Job) -> dict[str, Any]:
    s = {"task": exp.task, "experiment": exp.name, "config": dataclasses.asdict(job.cfg)}
    if exp.settings is not None:
        s.update(exp.settings(job))
    return s


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_usage())
        return 0
    try:
        exp, job = prepare(argv)
        torch.set_num_threads(job.args.threads)
        rank, _ = launch_rank()
        if job.args.fresh and job.out.exists():
            shutil.rmtree(job.out)
        if rank == 0:
            record_settings(job.out, _settings(exp, job))
        metrics = exp.run(job)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except hg.CheckpointError as e:  # the library's advice, in the CLI's words
        msg = str(e).splitlines()[0].replace(
            "delete it (or pass another `checkpoint=`) to start fresh",
            "delete it or rerun with --fresh")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if metrics is None:  # a non-zero rank of a torchrun job: rank 0 reports
        return 0
    print(exp.summary(metrics))
    print(f"wrote {job.out}")
    return 0
