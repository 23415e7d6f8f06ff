"""``python -m tasks <synthetic|ppi|ecg> [experiment] [options]``: see tasks/cli.py."""

import sys

from tasks.cli import main

if __name__ == "__main__":
    sys.exit(main())
