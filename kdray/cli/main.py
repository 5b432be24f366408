"""`kdray <command>` (also `python -m kdray`): the one command table.

Each command is a module of `kdray.cli` with `DESCRIPTION`, `EXAMPLES`, `arguments(parser)` and
`run(args)`, imported only when it runs, so `kdray --help`, `kdray --version` and every flag or
config mistake answer before torch or Ray is imported. `python -m kdray.search --budget 1e6`
is `kdray search --budget 1e6`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import Any

from kdray import __version__
from kdray.errors import UserError, run_cli


#: command -> (its module, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "search": ("kdray.cli.search", "the main command: teacher, search, final stage and report"),
    "teacher": ("kdray.cli.teacher", "fine-tune the teacher (or find it in the cache) and its logits"),
    "distill": ("kdray.cli.distill", "one distillation (one trial) of the space's student"),
    "final": ("kdray.cli.final", "rerun the final stage of a search: retrain, baselines, benchmark"),
    "report": ("kdray.cli.report", "rebuild a run's report.md, results.json and plots/"),
    "export": ("kdray.cli.export", "write a run's student as ONNX (fp32 and int8), checked against PyTorch"),
    "predict": ("kdray.cli.predict", "classify texts with a saved student, PyTorch or ONNX"),
    "budget": ("kdray.cli.budget", "count trainable parameters; the largest LoRA rank per module set"),
    "runs": ("kdray.cli.runs", "list the runs in an output directory with their best results"),
}


def usage() -> str:
    from kdray.config import shipped_spaces

    width = max(map(len, COMMANDS))
    lines = ["usage: kdray <command> [options]   (kdray <command> --help for its options)", "",
             "Find the best distilled, LoRA-adapted student classifier that fits a trainable-parameter",
             "budget, searched on a Ray cluster.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "examples:",
              "  kdray search --budget 1e6                       # the embedded default, offline, ~11 min on 2 CPUs",
              "  kdray search --space smoke --no-final           # tiny models: the whole search in about a minute",
              "  kdray search --budget 1e6 --set data.source=reviews.csv \\",
              "      --set data.text_columns=[review] --set data.label_column=sentiment",
              "  kdray runs                                      # what is in ./runs",
              "", f"shipped spaces (--space NAME): {', '.join(shipped_spaces())}",
              "options: -h/--help, --version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"kdray {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean `kdray {close[0]}`? " if close else ""
        raise UserError(f"unknown command {name!r}. Fix: {hint}one of {', '.join(COMMANDS)} (kdray --help).")
    module, parser = command(name)
    return module.run(parser.parse_args(rest))


def command(name: str) -> tuple[Any, argparse.ArgumentParser]:
    """The module of `kdray <name>` and its parser, flags added."""
    from kdray.cli.flags import command_parser

    module = importlib.import_module(COMMANDS[name][0])
    parser = command_parser(name, module.DESCRIPTION, module.EXAMPLES)
    module.arguments(parser)
    return module, parser


def entry() -> None:
    """The `kdray` console script."""
    run_cli(main)
