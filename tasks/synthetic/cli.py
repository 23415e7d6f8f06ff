"""``python -m tasks synthetic {rotation,noisy} [--config smoke|paper|tiny] [--seeds ...]``.

Each experiment writes ``metrics.json`` and a PNG to ``--out`` (default
``runs/synthetic/<experiment>``, ``..._<config>`` for configs other than paper). ``--export
PATH`` also writes the results JSON that tasks/synthetic/RESULTS.md renders (export.py), with
this command line and the run's time, and copies the plot next to it (PATH with ``.png``).
The rotation's paper and smoke configs run two hypergradients on the same seeds
(``also_ift="neumann"``: Algorithm 1's IFT next to the forward-mode tangent), each in
``<out>/<ift>/``; ``--set also_ift=none`` runs the first one alone in ``<out>``. Every seed
keeps a MetaPretrainer checkpoint in ``seed<k>/ckpt.pt`` and a finished seed's
``result.json`` is reused, so rerunning the same command after an interruption finishes the
work. Rotation: seed k starts from ``init_angles[k mod 10]`` (0, 18, ..., 162 degrees). Under
torchrun the seeds are spread over the ranks and rank 0 aggregates.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from tasks.cli import Experiment, Job
from tasks.common import launch_rank, seed_parallel, write_json
from tasks.harness import CLIError, check_out

from . import noisy as N
from . import rotation as R

# configs whose numbers are plumbing checks (rotation's smoke is the README demo: a result)
PLUMBING_CONFIGS = {"rotation": ("tiny",), "noisy": ("smoke", "tiny")}
DEFAULT_SEEDS = {"rotation": {"paper": "10", "smoke": "10", "tiny": "2"},
                 "noisy": {"paper": "5", "smoke": "1", "tiny": "1"}}


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="folder with MNIST idx files (default: sklearn's bundled digits)")
    p.add_argument("--export", metavar="JSON", default=None,
                   help="also write the results JSON (tables of RESULTS.md) with this command")


def _prepare(job: Job) -> None:
    if job.args.data_dir is not None:
        if not Path(job.args.data_dir).is_dir():
            raise CLIError(f"--data-dir {job.args.data_dir}: no such folder")
        job.cfg = dataclasses.replace(job.cfg, data_dir=job.args.data_dir)
    if job.args.export is not None:
        path = Path(job.args.export)
        if path.suffix != ".json":
            raise CLIError(f"--export {path}: give a .json file name")
        check_out(path.parent)


def _runner(mod: ModuleType, name: str):
    def run(job: Job) -> dict[str, Any] | None:
        rank, _ = launch_rank()
        plumbing = job.args.config in PLUMBING_CONFIGS[name]
        wall, cpu = time.perf_counter(), time.process_time()
        # under torchrun: seed parallel (rank r runs seeds r, r+N, ...), rank 0 aggregates
        metrics = seed_parallel(
            lambda mine: mod.run(job.cfg, mine, job.out, progress=job.progress and rank == 0,
                                 aggregate=False, device=job.device, plumbing=plumbing),
            job.seeds, lambda: mod.run(job.cfg, job.seeds, job.out, progress=False,
                                       device=job.device, plumbing=plumbing))
        if metrics is not None:  # smoke / tiny runs are plumbing checks, and say so
            metrics["plumbing"] = plumbing
            write_json(job.out / "metrics.json", metrics)
            if job.args.export is not None:
                # this invocation's time: the whole run's only when nothing was resumed
                elapsed = {"wall_s": time.perf_counter() - wall,
                           "cpu_s": time.process_time() - cpu}
                _export(name, metrics, job, plumbing, elapsed)
        return metrics

    return run


def _export(name: str, metrics: dict[str, Any], job: Job, plumbing: bool,
            elapsed: dict[str, float]) -> None:
    from .export import noisy_export, rotation_export

    kw = dict(command="python -m tasks " + shlex.join(job.argv), config=job.args.config,
              plumbing=plumbing, elapsed=elapsed)
    data = (rotation_export(metrics, **kw) if name == "rotation"
            else noisy_export(metrics, job.out, **kw))
    path = Path(job.args.export)
    write_json(path, data)
    png = job.out / ("rotation.png" if name == "rotation" else "weights.png")
    if png.exists():  # the plot next to its JSON, for RESULTS.md to show
        shutil.copyfile(png, path.with_suffix(".png"))


EXPERIMENTS = {
    name: Experiment(
        task="synthetic", name=name, description=mod.__doc__.split("\n")[0],
        configs=mod.CONFIGS, default_config="paper", run=_runner(mod, name), summary=mod.summary,
        default_seeds=DEFAULT_SEEDS[name],
        runs_glob=("seed*/*.json", "seed*/*.pt", "time_ratio.json", "*/seed*/*.json",
                   "*/seed*/*.pt", "*/time_ratio.json"),
        add_arguments=_arguments, prepare=_prepare,
        default_out=lambda c, n=name: f"runs/synthetic/{n}" + ("" if c == "paper" else f"_{c}"))
    for name, mod in (("rotation", R), ("noisy", N))
}
