"""`python -m kdray.search --budget 1e6`: kdray's main command, `kdray search`, by the name users know."""

import sys

from kdray.cli.main import main
from kdray.errors import run_cli


if __name__ == "__main__":
    run_cli(main, ["search", *sys.argv[1:]])
