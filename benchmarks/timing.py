"""Paired, interleaved timing: ratios measured in the same rounds, robust to a shared machine.

Each round runs every callable once (in a rotating order, after a ``gc.collect()`` and with the
collector paused), repeating a fast callable ``n`` times so that one timing lasts at least
``min_time`` seconds. On a shared machine the noise is one-sided (other processes only ever
make a call slower), so a ratio ``a / b`` is ``min(t_a) / min(t_b)`` over the rounds (the
``timeit`` convention); ``paired_ratio`` gives the median of the per-round ratios instead.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable


def _time(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def calibrate(fn: Callable[[], object], min_time: float) -> int:
    """Repetitions per timing so that one timing lasts about ``min_time``. The first call is
    the warm-up; a callable slower than ``min_time`` is not run a second time here."""
    t = _time(fn, 1)
    if t < min_time:
        t = _time(fn, 1)
    return max(1, math.ceil(min_time / max(t, 1e-9)))


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int = 7, min_time: float = 0.02
) -> dict[str, list[float]]:
    """Seconds per call of every callable, one entry per round."""
    reps = {k: calibrate(f, min_time) for k, f in fns.items()}
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        gc.collect()
        gc.disable()
        try:
            order = names[r % len(names):] + names[: r % len(names)]
            for k in order:
                out[k].append(_time(fns[k], reps[k]))
        finally:
            gc.enable()
    return out


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """``min(t_a) / min(t_b)`` over the rounds."""
    return min(times[a]) / min(times[b])


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``t_a / t_b`` from the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def median(times: dict[str, list[float]], a: str) -> float:
    return statistics.median(times[a])
