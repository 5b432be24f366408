"""`kdray search` (`python -m kdray.search`): the main command. Every input is checked before Ray
starts; then the pipeline runs the stages in order (`kdray.stages.pipeline`).

    kdray search --budget 1e6 [--space FILE] [--set key=value ...] [--trials N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kdray.artifacts import RunDir
from kdray.cli import flags
from kdray.config import load_config, origin_of
from kdray.errors import UserError


DESCRIPTION = ("Search for the best distilled LoRA student within a trainable-parameter budget: Ray Tune + Optuna "
               "(TPE) + ASHA, each trial a distillation. Over-budget configurations never train.")
EXAMPLES = (
    'kdray search --budget 1e6',
    'kdray search --space smoke --no-final',
    'kdray search --space imdb_cpu --budget 5e5 --trials 12 --name imdb',
    'kdray search --budget 1e6 --set data.source=reviews.csv --set data.text_columns=[review] --set data.label_column=sentiment',
    'python -m kdray.search --budget 1e6   (the same command)',
)


def arguments(ap: argparse.ArgumentParser) -> None:
    flags.add_budget(ap)
    flags.add_space(ap, "search.concurrency=1")
    ap.add_argument("--trials", type=int, help="number of trials that train (overrides search.trials)")
    ap.add_argument("--latency-budget", metavar="MS|Nx", help="only student shapes at most MS milliseconds per "
                    "example at batch 1 (e.g. 5), or at least N times faster than the teacher (e.g. 2x), measured "
                    "before the search on the device the final stage benchmarks on; shapes come from "
                    "space.keep_layers (search.latency_budget_ms / search.min_speedup)")
    ap.add_argument("--name", help="run name: the directory <output-dir>/<name>/ and the wandb group (default: "
                    "the space's name; when that run exists, the next free <name>-2, <name>-3, ...)")
    ap.add_argument("--overwrite", action="store_true", help="replace the run of this --name if it exists "
                    "(its directory is deleted once every input is checked)")
    flags.add_output_dir(ap)
    ap.add_argument("--storage-path", help="where Ray writes the Tune experiment and trial checkpoints on a "
                    "cluster: s3://BUCKET/PREFIX or a path every node mounts (default: the run directory)")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted search of this run name")
    flags.add_cluster(ap)
    flags.add_wandb(ap)
    ap.add_argument("--no-final", action="store_true",
                    help="stop after the search (later: kdray final --run runs/<name>)")
    ap.add_argument("--export", metavar="DIR", help="also copy the report (report.md, results.json, plots/) to DIR, "
                    "e.g. examples/<task>/: the small part of a run worth sharing")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.space, args.overrides, budget=args.budget, flags=_flag_fields(args))
    if cfg.budget is None:
        raise UserError("no budget. Fix: --budget 1e6 (trainable parameters), or `budget:` in the space.",
                        where=cfg.source_file)
    if cfg.student.mode != "lora":
        raise UserError(f"student.mode: the search tunes LoRA students, not {cfg.student.mode!r}. Fix: mode: lora.",
                        where=origin_of(cfg, "student.mode"))
    from kdray.runtime.cluster import check_address
    from kdray.sources import check_models
    from kdray.wandb_setup import wandb_mode_of

    wandb_mode = wandb_mode_of(args.wandb)
    run_dir = choose_run(args, cfg)
    if args.export is not None and args.no_final:
        raise UserError("--export copies the report, which --no-final does not make. Fix: drop one of them.")
    check_models(cfg)
    check_address(args.address)
    from kdray.stages import pipeline

    pipeline.run(cfg, run_dir, pipeline.Options(address=args.address, resume=args.resume, overwrite=args.overwrite,
                                                wandb_mode=wandb_mode, final=not args.no_final))
    if args.export is not None:
        from kdray.report.write import export

        export(run_dir.root, Path(args.export))
    return 0


def _flag_fields(args: argparse.Namespace) -> dict[str, tuple[object, str]]:
    """The config fields this command's own flags set, with the flag as the user typed it (so a
    problem with the field names the flag)."""
    fields: dict[str, tuple[object, str]] = {}
    if args.trials is not None:
        fields["search.trials"] = (args.trials, f"--trials {args.trials}")
    if args.name is not None:
        fields["name"] = (args.name, f"--name {args.name}")
    if args.storage_path is not None:
        fields["storage_path"] = (args.storage_path, f"--storage-path {args.storage_path}")
    if args.latency_budget is not None:
        fields.update(latency_flag(args.latency_budget))
    return fields


def latency_flag(text: str) -> dict[str, tuple[float, str]]:
    """`--latency-budget 5` (or `5ms`): milliseconds; `--latency-budget 2x`: a speed-up over the teacher."""
    flag = f"--latency-budget {text}"
    raw = text.strip().lower()
    field = "search.min_speedup" if raw.endswith("x") else "search.latency_budget_ms"
    try:
        value = float(raw.removesuffix("x").removesuffix("ms"))
    except ValueError:
        raise UserError(f"{flag}: not a latency budget. Fix: milliseconds per example at batch 1 (--latency-budget 5) "
                        f"or a speed-up over the teacher (--latency-budget 2x).") from None
    return {field: (value, flag)}


def choose_run(args: argparse.Namespace, cfg) -> RunDir:
    """The run directory of this search, checked: `--output-dir` must be a directory (or not
    exist yet). Without `--name` a run that exists gets a fresh name (`<name>-2`, ...; `cfg.name`
    follows); a `--name` that exists needs `--resume` or `--overwrite`."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {args.output_dir}: exists and is not a directory. Fix: pass a directory "
                        f"(it is created if missing), e.g. --output-dir runs.")
    run = RunDir.of(out, cfg.name)
    if args.resume:
        if args.overwrite:
            raise UserError("--resume continues a run and --overwrite deletes it. Fix: drop one of them.")
        if not run.optuna_db.is_file():
            raise UserError(f"--resume: no search to resume in {run.search}. Fix: drop --resume, or pass the "
                            f"--name/--output-dir/--storage-path of the killed run.")
        return run
    if not run.root.exists() or args.overwrite:
        return run
    if args.name is not None:
        raise UserError(f"--name {args.name}: {run.root} already holds a run. Fix: --resume to continue it, "
                        f"--overwrite to replace it, or another --name.")
    n = 2
    while RunDir.of(out, f"{cfg.name}-{n}").root.exists():
        n += 1
    cfg.name = f"{cfg.name}-{n}"
    print(f"run name: {cfg.name} ({run.root} already holds a run; --name NAME picks one, --resume continues it)")
    return RunDir.of(out, cfg.name)
