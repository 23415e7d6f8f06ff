"""torchrun worker that exits without ``hd.shutdown()``: ``hd.init`` must destroy the process
group at interpreter exit (while Python is alive), and the run must exit cleanly."""

import atexit

import torch
import torch.distributed as dist

from hypergrad import distributed as hd


def report() -> None:  # registered before init, so it runs after init's handler (LIFO)
    print(f"rank {hd.rank()} initialized at exit: {dist.is_initialized()}", flush=True)


atexit.register(report)
hd.init(backend="gloo", timeout_s=60)
x = torch.ones(1)
dist.all_reduce(x)
assert float(x) == hd.world_size() == 2
