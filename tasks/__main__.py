"""``python -m tasks <synthetic|ppi|ecg> [args]``: dispatch to ``tasks.<name>.cli.main``."""

from __future__ import annotations

import importlib
import sys

TASKS = ("synthetic", "ppi", "ecg")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TASKS:
        print(f"usage: python -m tasks {{{','.join(TASKS)}}} [options]   (then --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"tasks.{argv[0]}.cli")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
