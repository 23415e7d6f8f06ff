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


def _time(fn: Callable[[], object], n: int,
          clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    for _ in range(n):
        fn()
    return (clock() - t0) / n


def calibrate(fn: Callable[[], object], min_time: float) -> int:
    """Repetitions per timing so that one timing lasts about ``min_time``. The first call is
    the warm-up; a callable slower than ``min_time`` is not run a second time here."""
    t = _time(fn, 1)
    if t < min_time:
        t = _time(fn, 1)
    return max(1, math.ceil(min_time / max(t, 1e-9)))


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int = 7, min_time: float = 0.02, *,
    clock: Callable[[], float] = time.perf_counter, reps: int | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every callable, one entry per round. ``clock`` measures them (e.g.
    ``time.thread_time`` for the CPU time of single-threaded calls); ``reps`` fixes the
    repetitions per timing (after one warm-up call each) instead of calibrating them."""
    if reps is None:
        n = {k: calibrate(f, min_time) for k, f in fns.items()}
    else:
        for f in fns.values():
            f()
        n = dict.fromkeys(fns, reps)
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        gc.collect()
        gc.disable()
        try:
            order = names[r % len(names):] + names[: r % len(names)]
            for k in order:
                out[k].append(_time(fns[k], n[k], clock))
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
