"""`python -m kdray <command>`: the same as the `kdray` console script."""

from kdray.cli.main import entry


if __name__ == "__main__":
    entry()
