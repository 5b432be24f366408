"""`kdray report --run DIR`: rebuild a run's report (trains nothing)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdray.cli import flags
from kdray.errors import UserError


DESCRIPTION = "Rebuild results.json, report.md and plots/ of a run whose final stage has run (trains nothing)."
EXAMPLES = (
    'kdray report --run runs/default',
)


def arguments(ap: argparse.ArgumentParser) -> None:
    flags.add_run(ap, "a run whose final stage has run")
    flags.add_wandb(ap)
    ap.add_argument("--export", metavar="DIR", help="also copy report.md, results.json and plots/ to DIR")


def run(args: argparse.Namespace) -> int:
    from kdray.report.write import export, write_report
    from kdray.wandb_setup import wandb_mode_of

    run_dir = Path(args.run).resolve()
    if not (run_dir / "final" / "final.json").is_file():
        raise UserError(f"--run {args.run}: no final stage in it (final/final.json). Fix: run "
                        f"`kdray final --run {args.run}` first.")
    write_report(run_dir, wandb_mode=wandb_mode_of(args.wandb))
    if args.export is not None:
        export(run_dir, Path(args.export))
    return 0
