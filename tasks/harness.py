"""What every reproduction shares: settings, seeds, resumable runs, the time ratio.

A run of ``python -m tasks <task> ...`` (tasks/cli.py) is validated completely before the first
file is written: the ``--set`` overrides (:func:`apply_overrides`, each field parsed with its
type, then the config's own checks), ``--seeds`` (:func:`parse_seeds`), ``--out``
(:func:`check_out`) and the settings guard (:func:`check_settings`: a resumable ``--out`` never
mixes runs made with other settings). Every user mistake raises :class:`CLIError`, which the CLI
prints as one line.

Then the work resumes exactly: a finished unit of work is a JSON file (:func:`cached`; per seed:
:func:`run_seeds`), an unfinished meta-training is a ``MetaPretrainer`` checkpoint, and an
unreadable file stops the run with its name and the advice to rerun with ``--fresh``.

>>> parse_seeds("3"), parse_seeds("0,4"), parse_seeds("10-12")
([0, 1, 2], [0, 4], [10, 11, 12])
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from tasks.common import jsonable, write_json

__all__ = ["CLIError", "environment", "parse_seeds", "resolve_device", "apply_overrides",
           "override_keys", "check_fields", "check_out", "check_settings", "record_settings",
           "read_json", "load_file", "cached", "run_seeds", "time_ratio", "sync"]

FRESH = "rerun with --fresh to start over (it deletes --out)"


class CLIError(Exception):
    """A user mistake on the command line or in ``--out``: the CLI prints it as one line."""


def parse_seeds(text: str) -> list[int]:
    """``"N"`` (a count: seeds 0..N-1) or ids: ``"0,3,5"``, ``"10-19"`` (ranges inclusive)."""
    text = str(text).strip()
    try:
        if text.isdigit():
            n = int(text)
            if n < 1:
                raise CLIError(f"--seeds must be a count >= 1 or a list of seed ids, got {text!r}")
            return list(range(n))
        seeds: list[int] = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            a, sep, b = part.partition("-")
            lo, hi = int(a), int(b) if sep else int(a)
            if lo < 0 or hi < lo:
                raise ValueError
            seeds.extend(range(lo, hi + 1))
    except ValueError:
        raise CLIError(f"--seeds must be a count N (seeds 0..N-1) or seed ids like 0,3,5 or "
                       f"10-19, got {text!r}") from None
    if not seeds:
        raise CLIError(f"--seeds names no seed: {text!r}")
    return list(dict.fromkeys(seeds))


def resolve_device(name: str) -> torch.device:
    """``auto`` = ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error.
    Under torchrun, ``cuda`` means the rank's own GPU (``LOCAL_RANK``)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if name in ("auto", "cuda"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # under torchrun each rank takes its own GPU (LOCAL_RANK)
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        return torch.device("cuda", local)
    try:
        return torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}") from None


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (timing on a GPU); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --- configs and --set ----------------------------------------------------------------------

def override_keys(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every ``--set`` key of a dataclass config (nested ones dotted) with its current value."""
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            keys.update(override_keys(v, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = v
    return keys


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _parse_value(key: str, raw: str, current: Any, annotation: Any) -> Any:
    def bad(kind: str) -> CLIError:
        return CLIError(f"--set {key}: expected {kind}, got {raw!r}")

    if raw.lower() == "none" and (current is None or "None" in str(annotation)):
        return None
    if isinstance(current, bool) or "bool" in str(annotation) and current is None:
        if raw.lower() not in (*_TRUE, *_FALSE):
            raise bad("true or false")
        return raw.lower() in _TRUE
    kind = type(current) if current is not None else None
    if kind is None:  # a None default: the annotation says what it holds
        ann = str(annotation)
        kind = int if "int" in ann else float if "float" in ann else str
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        if kind is tuple:
            as_int = bool(current) and all(isinstance(v, int) for v in current)
            return tuple((int if as_int else float)(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise bad({int: "an integer", float: "a finite number", tuple: "comma-separated numbers"}
                  [kind]) from None
    return raw


def apply_overrides(cfg: Any, items: Iterable[str] | None) -> Any:
    """``key=value`` strings (``--set``; nested fields dotted: ``gin.num_layers=3``) applied to
    a frozen dataclass config, each value parsed with the field's type (booleans true/false,
    tuples comma-separated numbers, ``none`` where the field may be None); the config's own
    checks (``__post_init__``) then run. Any mistake raises :class:`CLIError`."""
    keys = override_keys(cfg)
    changes: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise CLIError(f"--set expects key=value, got {item!r} (no '=')")
        if key not in keys:
            raise CLIError(f"--set {key}: unknown key; known keys: {', '.join(sorted(keys))}")
        changes[key] = raw.strip()
    return _replace(cfg, changes, "")


def _replace(cfg: Any, changes: dict[str, str], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    new: dict[str, Any] = {}
    for name, f in fields.items():
        v = getattr(cfg, name)
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            sub = {k: r for k, r in changes.items() if k.startswith(key + ".")}
            if sub:
                new[name] = _replace(v, sub, key + ".")
        elif key in changes:
            new[name] = _parse_value(key, changes[key], v, f.type)
    if not new:
        return cfg
    try:
        return dataclasses.replace(cfg, **new)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--set: {e}") from None


def check_fields(cfg: Any, *, positive: Iterable[str] = (), nonneg: Iterable[str] = (),
                 fraction: Iterable[str] = (), choices: dict[str, Iterable[Any]] | None = None
                 ) -> None:
    """A config's ``__post_init__`` checks: ``positive`` fields >= 1 (ints) or > 0, ``nonneg``
    >= 0, ``fraction`` in [0, 1], ``choices`` membership. Raises ValueError naming the field."""
    for name in positive:
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise ValueError(f"`{name}` must be positive, got {v!r}")
    for name in nonneg:
        v = getattr(cfg, name)
        if v is not None and not v >= 0:
            raise ValueError(f"`{name}` must be >= 0, got {v!r}")
    for name in fraction:
        v = getattr(cfg, name)
        if not 0 <= v <= 1:
            raise ValueError(f"`{name}` must be in [0, 1], got {v!r}")
    for name, allowed in (choices or {}).items():
        allowed = tuple(allowed)
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(cfg, name)!r}")


# --- --out, the settings guard, files ---------------------------------------------------------

def check_out(out: Path) -> None:
    """``--out`` must be a folder, or creatable: never a file, never under a read-only one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CLIError(f"--out {out}: {probe} is a file, so the folder cannot be created")
    try:  # a probe file, removed at once (os.access says yes to root everywhere)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise CLIError(f"--out {out}: cannot write in {probe} ({e.strerror or e}); choose "
                       "another --out") from None


def check_settings(out: Path, settings: dict[str, Any], runs_glob: str | tuple[str, ...]
                   ) -> None:
    """Refuse (CLIError) an ``out`` holding work (files matching ``runs_glob``: results and
    checkpoints) made with settings other than ``settings`` (its ``settings.json``), or with
    no record: finished runs and checkpoints are reused by file name, so other settings would
    mix silently. A record without any work (a run that stopped before its first result) is
    no reason to refuse. Reads only; :func:`record_settings` writes."""
    out = Path(out)
    path = out / "settings.json"
    globs = (runs_glob,) if isinstance(runs_glob, str) else runs_glob
    if not out.is_dir() or not any(any(out.glob(g)) for g in globs):
        if path.exists():
            read_json(path)  # a corrupt record is still named
        return
    if not path.exists():
        raise CLIError(f"--out {out} holds runs whose settings were not recorded; use a new "
                       "--out or --fresh")
    want = json.loads(json.dumps(jsonable(settings), default=str))
    if read_json(path) != want:
        raise CLIError(f"--out {out} holds runs made with other settings ({path}); use a "
                       "new --out or --fresh")


def record_settings(out: Path, settings: dict[str, Any]) -> None:
    write_json(Path(out) / "settings.json", settings)


def environment(packages: Iterable[str] = ("torch", "numpy", "scipy", "scikit-learn",
                                            "torch-geometric")) -> dict[str, str]:
    """Python's and each installed package's version, for a results JSON: the same command can
    give other numbers under other versions (e.g. a random stream or a kernel that changed)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def read_json(path: Path) -> Any:
    """A JSON file written by a run; an unreadable one is a CLIError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CLIError(f"{path} is corrupt ({type(e).__name__}); delete it or {FRESH}") from None


def load_file(path: Path, map_location: Any = "cpu") -> Any:
    """A tensor file written by a run (``torch.load(weights_only=True)``: plain data only);
    an unreadable one is a CLIError naming it."""
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except Exception as e:  # truncated, garbage, or a pickle that is not plain data
        raise CLIError(f"{path} is corrupt or not a result file ({type(e).__name__}); delete it "
                       f"or {FRESH}") from None


def cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The JSON at ``path`` if a run finished it, else ``compute()`` written there atomically."""
    path = Path(path)
    if path.exists():
        return read_json(path)
    res = compute()
    write_json(path, res)
    return res


def run_seeds(out: Path, seeds: list[int], run_one: Callable[[int, Path], dict[str, Any]],
              progress: bool = True, desc: str = "seeds") -> list[dict[str, Any]]:
    """``run_one(seed, out/seed<k>)`` for every seed without a ``result.json``; the rest load.
    ``run_one`` keeps its MetaPretrainer checkpoint in its folder, so a killed seed resumes."""
    from tqdm.auto import tqdm

    results = []
    for seed in tqdm(seeds, desc=desc, disable=not progress):
        d = Path(out) / f"seed{seed}"
        results.append(cached(d / "result.json",
                              lambda s=seed, d=d: {**run_one(s, d), "seed": s}))
    return results


# --- the meta / plain time ratio ---------------------------------------------------------------

def time_ratio(make: Callable[[bool], Callable[[], Any]], *, repeats: int = 3,
               device: torch.device | str = "cpu", **extra: Any) -> dict[str, Any]:
    """Meta-PT over plain-PT time, the same way for every task.

    ``make(meta)`` builds a fresh run (same data, P, K, batches; ``meta=False`` = plain PT) and
    returns a callable doing it. Plain and meta runs alternate ``repeats`` times; wall time
    (device-synchronised) and process CPU time are recorded. ``ratio`` is min(meta) / min(plain)
    of wall time, the least disturbed by other load; medians and the CPU ratio come with it.
    """
    wall: dict[str, list[float]] = {"plain": [], "meta": []}
    cpu: dict[str, list[float]] = {"plain": [], "meta": []}
    for _ in range(repeats):
        for name in ("plain", "meta"):
            go = make(name == "meta")
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            go()
            sync(device)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "ratio": min(wall["meta"]) / min(wall["plain"]),
        "ratio_median": med(wall["meta"]) / med(wall["plain"]),
        "cpu_ratio": sum(cpu["meta"]) / sum(cpu["plain"]),
        "meta_seconds": wall["meta"], "plain_seconds": wall["plain"], "repeats": repeats,
        **extra,
    }
