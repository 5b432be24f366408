"""kdray's main command: teacher -> search -> final stage -> report, orchestrated here.

    python -m kdray.search --budget 1e6 [--space FILE] [--set key=value ...] [--trials N]

Every input is checked before Ray starts; then each stage runs through its own module's entry
point (`kdray.study.run_search`, `kdray.final.run_final`, `kdray.report.write_report`), which
reads what the one before wrote into the run directory (`kdray.rundir.RunDir`).
"""

from __future__ import annotations

import argparse

from kdray.cluster import add_cluster_arguments
from kdray.config import add_space_arguments, load_config
from kdray.errors import UserError
from kdray.rundir import RunDir


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m kdray.search", description=(
        "Search for the best distilled LoRA student within a trainable-parameter budget: Ray Tune + "
        "Optuna (TPE) + ASHA, each trial a distillation. Over-budget configurations never train."))
    ap.add_argument("--budget", type=float, help="trainable-parameter budget of the student, counted in parameters "
                    "(head included), e.g. 1e6; default: the space's `budget`")
    add_space_arguments(ap, "search.concurrency=1")
    ap.add_argument("--trials", type=int, help="number of trials that train (overrides search.trials)")
    ap.add_argument("--name", help="run name: the directory <output-dir>/<name>/ and the wandb group")
    ap.add_argument("--output-dir", default="runs", help="parent of the run directory (default: ./runs)")
    ap.add_argument("--storage-path", help="where Ray writes the Tune experiment and trial checkpoints on a "
                    "cluster: s3://BUCKET/PREFIX or a path every node mounts (default: the run directory)")
    ap.add_argument("--resume", action="store_true", help="continue the killed search of this run name")
    add_cluster_arguments(ap, workers=False)
    ap.add_argument("--wandb", choices=["online", "offline", "disabled"],
                    help="wandb mode (default: online with WANDB_API_KEY set, else offline)")
    ap.add_argument("--no-final", action="store_true",
                    help="stop after the search (later: python -m kdray.final --run runs/<name>)")
    ap.add_argument("--export", metavar="DIR", help="also copy the report (report.md, results.json, plots/) to DIR, "
                    "e.g. examples/<task>/: the small part of a run worth sharing")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.trials is not None:
        overrides.append(f"search.trials={args.trials}")
    if args.name is not None:
        overrides.append(f"name={args.name}")
    if args.storage_path is not None:
        overrides.append(f"storage_path={args.storage_path}")
    cfg = load_config(args.space, overrides, budget=args.budget)
    if cfg.budget is None:
        raise UserError("no budget. Fix: --budget 1e6 (trainable parameters), or `budget:` in the space.",
                        where=cfg.source_file)
    if cfg.student.mode != "lora":
        raise UserError(f"student.mode: the search tunes LoRA students, not {cfg.student.mode!r}. Fix: mode: lora.",
                        where=cfg.source_file)
    from kdray.report import wandb_mode_of

    wandb_mode = wandb_mode_of(args.wandb)
    run = RunDir.of(args.output_dir, cfg.name)
    if args.resume and not run.optuna_db.is_file():
        raise UserError(f"--resume: no search to resume in {run.search}. Fix: drop --resume, or pass the "
                        f"--name/--output-dir/--storage-path of the killed run.")
    if not args.resume and run.search.exists():
        raise UserError(f"{run.search} already holds a search. Fix: --resume to continue it, or --name NEW.")
    if args.export is not None and args.no_final:
        raise UserError("--export copies the report, which --no-final does not make. Fix: drop one of them.")

    from kdray.budget import require_feasible
    from kdray.cluster import init_ray
    from kdray.data import load_data
    from kdray.models import encoder_count
    from kdray.study import describe, run_search, summarize, wandb_callback

    task = load_data(cfg.data)  # bad data exits 2 here, before Ray starts
    require_feasible(cfg, task.num_labels)
    n_layers = encoder_count(cfg.student, task.num_labels)
    describe(cfg, task.num_labels, n_layers)
    # Before Ray starts: the logging actor takes WANDB_MODE from the environment Ray forwards.
    wandb = wandb_callback(wandb_mode, cfg, run)
    init_ray(args.address)
    result = run_search(cfg, task, run, n_layers, resume=args.resume, wandb=wandb)
    summarize(result, cfg)
    if args.no_final:
        print(f"final stage skipped (--no-final); run it with: python -m kdray.final --run {run.root}")
        return 0
    if result.best is None:
        raise RuntimeError("no trial reported a validation accuracy: nothing for the final stage to retrain")
    from kdray.final import run_final
    from kdray.report import export, write_report

    run_final(cfg, task, run.root)
    write_report(run.root, wandb_mode=wandb_mode)
    if args.export is not None:
        from pathlib import Path

        export(run.root, Path(args.export))
    return 0
