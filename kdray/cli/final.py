"""`kdray final --run DIR`: the final stage and report of a finished search, again."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdray.artifacts import RunDir, load_choice, load_trials
from kdray.cli import flags
from kdray.config import RunConfig
from kdray.errors import UserError


DESCRIPTION = ("Rerun the final stage of a search: retrain the best configuration with several seeds and the no-KD "
               "and head-only baselines, save the merged student, benchmark everything against the teacher on the "
               "test split, and write results.json, report.md and plots/.")
EXAMPLES = (
    'kdray final --run runs/default',
)


def arguments(ap: argparse.ArgumentParser) -> None:
    flags.add_run(ap, "a finished search")
    flags.add_seeds(ap, "seeds per configuration (default: the run's final.seeds)")
    flags.add_cluster(ap)
    flags.add_wandb(ap)


def run(args: argparse.Namespace) -> int:
    cfg, run = load_run(args.run)
    flags.check_seeds(args.seeds)
    best = load_choice(run)  # a damaged best_config.yaml or trials.parquet exits 2 here, before Ray
    load_trials(run)
    from kdray.data.load import load_data
    from kdray.runtime.cluster import start
    from kdray.stages.pipeline import final_again
    from kdray.wandb_setup import wandb_mode_of

    wandb_mode = wandb_mode_of(args.wandb)
    task = load_data(cfg.data)
    plan = start(cfg, args.address)
    final_again(cfg, task, run, plan, best, seeds=args.seeds, wandb_mode=wandb_mode)
    return 0


def load_run(run: str | Path) -> tuple[RunConfig, RunDir]:
    """The resolved config of a finished search in `run`; exits 2 if it is not one."""
    from kdray.config import load_config

    rd = RunDir(Path(run).resolve())
    missing = [p.name for p in (rd.config, rd.best_config) if not p.is_file()]
    if missing:
        raise UserError(f"--run {run}: not a finished search (no {' or '.join(missing)}). Fix: pass a run "
                        f"directory written by `kdray search` (runs/<name>/).")
    return load_config(rd.config), rd
