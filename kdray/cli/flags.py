"""The flags several commands share, each defined once, and the parser every command starts from."""

from __future__ import annotations

import argparse
import difflib
import re
import sys

from kdray.config import shipped_spaces
from kdray.errors import UserError


WANDB_MODES = ("online", "offline", "disabled")


def command_parser(name: str, description: str, examples: tuple[str, ...]) -> argparse.ArgumentParser:
    """`kdray <name>`'s parser: its description, and after the flags its examples and the shipped spaces."""
    epilog = "\n".join(["examples:", *(f"  {e}" for e in examples), "",
                        f"shipped spaces (--space NAME): {', '.join(shipped_spaces())}"])
    return CommandParser(prog=f"kdray {name}", description=description, epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter)


class CommandParser(argparse.ArgumentParser):
    """argparse's parser whose errors end, like every kdray error, with the fix (exit status 2)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}. Fix: {self._fix(message)}\n")

    def _fix(self, message: str) -> str:
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], flags, n=1)
            if close:
                return f"did you mean {close[0]}? (`{self.prog} --help` lists the flags)"
        bad_value = re.match(r"argument (\S+?)(/\S+)?: invalid (\w+) value", message)
        if bad_value:
            kind = {"float": "a number, e.g. 1e6", "int": "a whole number, e.g. 2"}.get(bad_value.group(3), "a value")
            return f"give {bad_value.group(1)} {kind}."
        return f"see `{self.prog} --help`."


def add_space(ap: argparse.ArgumentParser, set_example: str) -> None:
    """`--space` and `--set`: the search space a command reads, and changes to it."""
    ap.add_argument("--space", help="search-space YAML, or a shipped space's name (default: default)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a config field, e.g. --set {set_example} (repeatable)")


def add_budget(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--budget", type=float, help="trainable-parameter budget of the student, counted in parameters "
                    "(head included), e.g. 1e6; default: the space's `budget`")


def add_cluster(ap: argparse.ArgumentParser, workers: bool = False) -> None:
    """`--address` (and `--workers`) for every command that runs on Ray, and `--verbose`."""
    ap.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start one locally)")
    if workers:
        ap.add_argument("--workers", type=int, help="Ray Train workers (overrides resources.workers)")
    ap.add_argument("--verbose", action="store_true", help="also print Ray's, Tune's, the trial processes' and "
                    "Optuna's own output (default: kdray's progress only)")


def add_wandb(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--wandb", choices=WANDB_MODES,
                    help="wandb mode (default: online with WANDB_API_KEY or a `wandb login`, else offline)")


def add_output_dir(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--output-dir", default="runs", help="parent of the run directory (default: ./runs)")


def add_run(ap: argparse.ArgumentParser, what: str) -> None:
    ap.add_argument("--run", required=True, help=f"run directory of {what} (runs/<name>/)")


def add_seeds(ap: argparse.ArgumentParser, help_text: str, default: int | None = None) -> None:
    ap.add_argument("--seeds", type=int, default=default, help=help_text)


def worker_overrides(args: argparse.Namespace) -> list[str]:
    """`--workers N` as the `--set` it stands for."""
    return [f"resources.workers={args.workers}"] if getattr(args, "workers", None) is not None else []


def check_seeds(seeds: int | None) -> None:
    """A `--seeds N` flag: N runs per configuration, at least one."""
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds {seeds}: needs at least 1 seed. Fix: give 1 or more, e.g. --seeds 3.")
