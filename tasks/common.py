"""Small utilities shared by the reproductions: seeding, JSON results, atomic checkpoints."""

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


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` (tensors and numpy converted) as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # concurrent writers: own tmp
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file then rename: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def seed_parallel(
    run_seeds: Callable[[list[int]], Any], seeds: list[int], aggregate: Callable[[], Any],
    *, timeout_s: float = 7 * 24 * 3600.0,
) -> Any:
    """Independent per-seed runs spread over the ranks of ``torchrun``, then one aggregate.

    Rank r runs ``run_seeds(seeds[r::world])`` (each seed single-process, resumable through its
    own files); after every rank finished, rank 0 alone calls ``aggregate()`` (which reads the
    finished seeds' files) and returns its value; other ranks return None. A rank that raises
    makes every rank raise (no hang, no aggregate of a partial run); a rerun resumes. Outside
    torchrun: ``run_seeds(seeds)`` then ``aggregate()``. ``timeout_s`` bounds the wait for the
    slowest rank.
    """
    import torch.distributed as dist

    from hypergrad import distributed as hd

    if not hd.init(backend="gloo", timeout_s=timeout_s):
        run_seeds(seeds)
        return aggregate()
    failed = torch.zeros(1)
    error: BaseException | None = None
    try:
        mine = seeds[hd.rank():: hd.world_size()]
        if mine:
            run_seeds(mine)
    except Exception as exc:  # reported after every rank agreed the run failed
        failed += 1
        error = exc
    dist.all_reduce(failed)
    if failed.item():
        raise RuntimeError(
            f"{int(failed.item())} of {hd.world_size()} ranks failed"
            + (f"; this rank: {error!r}" if error else "") + "; rerun to resume finished seeds"
        ) from error
    return aggregate() if hd.is_main() else None
