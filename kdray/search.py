"""`python -m kdray.search --budget 1e6`: kdray's main command (`kdray.pipeline`).

The search stage itself is `kdray.study`; this module is only the command's name, kept so the
command users know keeps working.
"""

from kdray.errors import run_cli
from kdray.pipeline import main

if __name__ == "__main__":
    run_cli(main)
