"""Peak memory of one hypergradient, each configuration in a fresh Python process.

Measure: the rise of the process's peak resident set size (``VmHWM`` in ``/proc/self/status``)
over its resident size just before the measured call, after a warm-up call of the same method
with a short horizon (T <= 4). The peak is reset right before the call by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0), so only the measured call's own high-water mark
counts. The child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: every tensor buffer above 64 KiB
is its own ``mmap`` and goes back to the OS when freed (glibc would otherwise raise the threshold
dynamically and keep freed buffers in the heap), so RSS follows the live tensor bytes. Without
``clear_refs`` (other OSes) it falls back to ``ru_maxrss`` deltas without the reset (a lower
bound: the warm-up's peak hides part of the measured one). Numbers are KiB of CPU memory.

    python -m benchmarks.memory --method unroll --problem mlp100k --T 50 --K 5

Methods: ``grad`` (one inner gradient: the unit), ``ift`` (T plain SGD steps without a graph,
then ``implicit_grad`` with 10 CG iterations), ``unroll`` (``hg.unroll``; ``--K`` truncates,
``--ckpt c`` checkpoints every c steps), ``higher`` and ``torchopt`` (full/truncated unrolls).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build(method: str, problem, T: int, K: int | None, ckpt: int | None, lr: float):
    from . import methods as M

    if method == "grad":
        return M.grad(problem)
    if method == "ift":
        ift = M.hg_implicit(problem, "cg", 10)

        def run():
            M._leaves_after_free_steps(problem, T, lr)  # the inner solve: no graph kept
            return ift()

        return run
    if method == "unroll":
        return M.hg_unroll(problem, T, K, lr=lr, checkpoint_every=ckpt)
    if method in ("higher", "torchopt"):
        return M.UNROLLS[method](problem, T, K, lr=lr)
    raise ValueError(f"unknown method {method!r}")


def child(args: argparse.Namespace) -> dict:
    import warnings

    import torch

    from .problems import make_problem

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    P = make_problem(args.problem, batch=args.batch)
    fn = build(args.method, P, args.T, args.K, args.ckpt, args.lr)
    # warm-up (lazy initialisation, code pages) on the same code path with a short horizon
    Tw = min(args.T, 4)
    Kw = None if args.K is None else min(args.K, max(Tw - 1, 1))
    build(args.method, P, Tw, Kw, None if args.ckpt is None else 2, args.lr)()
    gc.collect()
    reset = _reset_peak()
    before = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": args.method, "problem": args.problem, "batch": P.batch, "T": args.T,
        "K": args.K, "ckpt": args.ckpt, "peak_kib": peak - before, "seconds": seconds,
        "measure": "VmHWM-after-clear_refs" if reset else "ru_maxrss",
    }


def measure(method: str, problem: str, *, T: int = 0, K: int | None = None,
            ckpt: int | None = None, batch: int | None = None, lr: float = 1.0,
            timeout: float = 600) -> dict:
    """Run one configuration in a fresh interpreter and return its JSON record."""
    cmd = [sys.executable, "-m", "benchmarks.memory", "--method", method, "--problem", problem,
           "--T", str(T), "--lr", str(lr)]
    for flag, val in (("--K", K), ("--ckpt", ckpt), ("--batch", batch)):
        if val is not None:
            cmd += [flag, str(val)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--problem", default="mlp100k")
    ap.add_argument("--T", type=int, default=0)
    ap.add_argument("--K", type=int, default=None)
    ap.add_argument("--ckpt", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1.0)
    print(json.dumps(child(ap.parse_args(argv))))


if __name__ == "__main__":
    main()
