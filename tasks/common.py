"""Small utilities shared by the reproductions: seeding, JSON results, atomic writes, and the
seed-parallel launch under torchrun (the run mechanics are in tasks/harness.py)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator seeded with ``seed`` for data."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` (tensors and numpy converted) as indented JSON, atomically."""
    text = json.dumps(jsonable(obj), indent=2, sort_keys=True)
    return _write_atomic(path, lambda tmp: tmp.write_text(text))


def _write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write`` a temporary file, then rename it to ``path``: a killed run never leaves half a
    file, and the temporary name is per process, so concurrent writers cannot collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file then rename: a killed run never leaves half a file."""
    return _write_atomic(path, lambda tmp: torch.save(obj, tmp))


def mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def launch_rank() -> tuple[int, int]:
    """``(rank, world size)`` from torchrun's environment; ``(0, 1)`` outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def seed_parallel(
    run_seeds: Callable[[list[int]], Any], seeds: list[int], aggregate: Callable[[], Any],
    *, timeout_s: float = 7 * 24 * 3600.0, poll_s: float = 1.0,
) -> Any:
    """Independent per-seed runs spread over the ranks of ``torchrun``, then one aggregate.

    Rank r runs ``run_seeds(seeds[r::world])``; after every rank finished, rank 0 alone calls
    ``aggregate()`` (which reads the finished seeds' files) and returns its value; other ranks
    return None. No process group is created: every seed runs as a single process (its
    checkpoints, progress and ``hypergrad.distributed`` calls behave as without torchrun), and
    the ranks only meet in torchrun's key-value store. A rank that fails makes rank 0 raise (no
    aggregate of a partial run; torchrun then stops the others); a rerun resumes the finished
    seeds. Outside torchrun: ``run_seeds(seeds)`` then ``aggregate()``.
    """
    import datetime
    import time

    import torch.distributed as dist

    rank, world = launch_rank()
    if world == 1:
        run_seeds(seeds)
        return aggregate()
    # torchrun's agent hosts a store at MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE); without
    # an agent, rank 0 hosts it. Keys are per restart of the worker group.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.PrefixStore(
        f"hypergrad/seed_parallel/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/",
        dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                      is_master=rank == 0 and not agent,
                      timeout=datetime.timedelta(seconds=timeout_s)))
    try:
        mine = seeds[rank::world]
        if mine:
            run_seeds(mine)
    except BaseException:
        store.add("failed", 1)
        raise
    store.add("done", 1)
    if rank != 0:
        return None
    deadline = time.monotonic() + timeout_s
    while store.add("done", 0) + store.add("failed", 0) < world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"seed_parallel: ranks still running after {timeout_s:g} s")
        time.sleep(poll_s)
    failed = store.add("failed", 0)
    if failed:
        raise RuntimeError(f"{failed} of {world} ranks failed; rerun to resume finished seeds")
    return aggregate()
