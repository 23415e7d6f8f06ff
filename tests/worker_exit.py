"""How the torchrun test workers end: skip the interpreter's teardown.

After the process group is destroyed, gloo's C++ threads can still abort the process at exit
("terminate called without an active exception", about one run in three of
tests/test_distributed.py on 2 CPU cores), which would fail a run whose results are already
written and checked.
"""

from __future__ import annotations

import os
import sys


def run_and_exit(main) -> None:
    """Run ``main()``; if it returns, flush and leave with status 0 without teardown (an
    exception still propagates and fails the rank)."""
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
