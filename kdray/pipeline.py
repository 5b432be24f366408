"""kdray's main command: teacher -> search -> final stage -> report, orchestrated here.

    python -m kdray.search --budget 1e6 [--space FILE] [--set key=value ...] [--trials N]

Every input is checked before Ray starts; then each stage runs through its own module's entry
point (`kdray.study.run_search`, `kdray.final.run_final`, `kdray.report.write_report`), which
reads what the one before wrote into the run directory (`kdray.rundir.RunDir`).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any

from kdray.cluster import add_cluster_arguments
from kdray.config import add_space_arguments, check_seeds_flag, help_epilog, load_config, origin_of
from kdray.errors import UserError
from kdray.rundir import RunDir


#: What `--help` shows as examples.
EXAMPLES = (
    'kdray search --budget 1e6',
    'kdray search --space smoke --no-final',
    'kdray search --space imdb_cpu --budget 5e5 --trials 12 --name imdb',
    'kdray search --budget 1e6 --set data.source=reviews.csv --set data.text_columns=[review] --set data.label_column=sentiment',
    'python -m kdray.search --budget 1e6   (the same command)',
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kdray search", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_epilog(*EXAMPLES),
        description=(
        "Search for the best distilled LoRA student within a trainable-parameter budget: Ray Tune + "
        "Optuna (TPE) + ASHA, each trial a distillation. Over-budget configurations never train."))
    ap.add_argument("--budget", type=float, help="trainable-parameter budget of the student, counted in parameters "
                    "(head included), e.g. 1e6; default: the space's `budget`")
    add_space_arguments(ap, "search.concurrency=1")
    ap.add_argument("--trials", type=int, help="number of trials that train (overrides search.trials)")
    ap.add_argument("--latency-budget", metavar="MS|Nx", help="only student shapes at most MS milliseconds per "
                    "example at batch 1 (e.g. 5), or at least N times faster than the teacher (e.g. 2x), measured "
                    "before the search on the device the final stage benchmarks on; shapes come from "
                    "space.keep_layers (search.latency_budget_ms / search.min_speedup)")
    ap.add_argument("--name", help="run name: the directory <output-dir>/<name>/ and the wandb group (default: "
                    "the space's name; when that run exists, the next free <name>-2, <name>-3, ...)")
    ap.add_argument("--overwrite", action="store_true", help="replace the run of this --name if it exists "
                    "(its directory is deleted once every input is checked)")
    ap.add_argument("--output-dir", default="runs", help="parent of the run directory (default: ./runs)")
    ap.add_argument("--storage-path", help="where Ray writes the Tune experiment and trial checkpoints on a "
                    "cluster: s3://BUCKET/PREFIX or a path every node mounts (default: the run directory)")
    ap.add_argument("--resume", action="store_true", help="continue the killed search of this run name")
    add_cluster_arguments(ap, workers=False)
    ap.add_argument("--wandb", choices=["online", "offline", "disabled"],
                    help="wandb mode (default: online with WANDB_API_KEY set, else offline)")
    ap.add_argument("--verbose", action="store_true", help="also print Ray's, Tune's, the trial processes' and "
                    "Optuna's own output (default: kdray's progress only)")
    ap.add_argument("--no-final", action="store_true",
                    help="stop after the search (later: kdray final --run runs/<name>)")
    ap.add_argument("--export", metavar="DIR", help="also copy the report (report.md, results.json, plots/) to DIR, "
                    "e.g. examples/<task>/: the small part of a run worth sharing")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {}
    if args.trials is not None:
        flags["search.trials"] = (args.trials, f"--trials {args.trials}")
    if args.name is not None:
        flags["name"] = (args.name, f"--name {args.name}")
    if args.storage_path is not None:
        flags["storage_path"] = (args.storage_path, f"--storage-path {args.storage_path}")
    if args.latency_budget is not None:
        flags.update(latency_flag(args.latency_budget))
    cfg = load_config(args.space, args.overrides, budget=args.budget, flags=flags)
    if cfg.budget is None:
        raise UserError("no budget. Fix: --budget 1e6 (trainable parameters), or `budget:` in the space.",
                        where=cfg.source_file)
    if cfg.student.mode != "lora":
        raise UserError(f"student.mode: the search tunes LoRA students, not {cfg.student.mode!r}. Fix: mode: lora.",
                        where=origin_of(cfg, "student.mode"))
    from kdray.cluster import check_address
    from kdray.sources import check_models
    from kdray.tracking import wandb_mode_of

    wandb_mode = wandb_mode_of(args.wandb)
    run = choose_run(args, cfg)
    if args.export is not None and args.no_final:
        raise UserError("--export copies the report, which --no-final does not make. Fix: drop one of them.")
    check_models(cfg)
    check_address(args.address)

    from kdray.data import load_data

    task = load_data(cfg.data)  # bad data exits 2 here, before torch, Ray or Tune is imported
    from kdray.budget import require_feasible
    from kdray.cluster import start
    from kdray.models import encoder_count
    from kdray.study import describe, wandb_callback

    require_feasible(cfg, task.num_labels)
    if args.overwrite and run.root.exists():
        print(f"--overwrite: deleting the earlier run {run.root}")
        shutil.rmtree(run.root)
    n_layers = encoder_count(cfg.student, task.num_labels)
    describe(cfg, task.num_labels, n_layers)
    # Before Ray starts: WANDB_MODE is set for this process and the ones Ray starts.
    wandb = wandb_callback(wandb_mode, cfg, run)
    plan = start(cfg, args.address)  # a local run's impossible placement exits 2 here, before Ray
    run_pipeline(cfg, task, run, plan, n_layers=n_layers, resume=args.resume, wandb=wandb, wandb_mode=wandb_mode,
                 final=not args.no_final)
    if args.export is not None:
        from kdray.report import export

        export(run.root, Path(args.export))
    return 0


def run_pipeline(cfg: Any, task: Any, run: RunDir, plan: Any, *, n_layers: int, resume: bool = False,
                 wandb: Any = None, wandb_mode: str = "disabled", final: bool = True) -> None:
    """The stages in order, each once: shapes (when searched), teacher, distillation inputs,
    the students' memory probe (on GPUs), search, final stage, report."""
    import yaml

    from kdray.cluster import warn_if_storage_is_local
    from kdray.config import to_dict
    from kdray.study import run_search, summarize
    from kdray.tracking import wandb_sync_hint

    print(f"data: {task.description}")
    run.root.mkdir(parents=True, exist_ok=True)
    run.config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    warn_if_storage_is_local(cfg)
    shapes = None
    if cfg.space.keep_layers or cfg.search.latency_budget_ms is not None or cfg.search.min_speedup is not None:
        from kdray.shapes import describe_shapes, measure

        shapes = measure(cfg, task, plan.students)  # a latency budget no shape meets exits 2 here, before Tune
        describe_shapes(shapes, cfg)
    teacher, inputs, students = teacher_and_inputs(cfg, task, plan, run.root)
    result = run_search(cfg, task, run, n_layers, inputs, students, resume=resume, wandb=wandb, shapes=shapes)
    summarize(result, cfg)
    if wandb_mode == "offline":
        print(wandb_sync_hint(run.wandb))
    if not final:
        print(f"final stage skipped (--no-final); run it with: kdray final --run {run.root}")
        return
    if result.best is None:
        raise RuntimeError("no trial reported a validation accuracy: nothing for the final stage to retrain")
    from kdray.final import run_final
    from kdray.report import write_report

    run_final(cfg, task, run, teacher, inputs, students, result.best)
    write_report(run.root, wandb_mode=wandb_mode)


def teacher_and_inputs(cfg: Any, task: Any, plan: Any, run_root: Path) -> tuple[Any, tuple[Any, Any], Any]:
    """The teacher stage (cached), the distillation inputs `(job, data)` every student trial
    shares, and the students' plan sized by the memory probe (on GPUs)."""
    from kdray.cluster import storage_join, storage_root
    from kdray.loop import distill_inputs
    from kdray.study import largest_student
    from kdray.tasks import size_students
    from kdray.teacher import prepare_teacher

    teacher = prepare_teacher(cfg, task, plan=plan.teacher, storage_path=storage_join(storage_root(cfg, run_root), "train"))
    inputs = distill_inputs(cfg, task, teacher)
    job, data = inputs
    students = size_students(plan.students, dataclasses.replace(job, model=largest_student(cfg)), data,
                             cfg.search.concurrency)
    print(students.line(cfg.train.precision), flush=True)
    return teacher, inputs, students


def rerun_final(argv: list[str] | None = None) -> int:
    """`kdray final --run DIR`: the final stage and report of a finished search, again."""
    from kdray.final import build_parser as final_parser, load_run

    args = final_parser().parse_args(argv)
    cfg, run_dir = load_run(args.run)
    check_seeds_flag(args.seeds)

    import yaml

    from kdray.cluster import start
    from kdray.data import load_data
    from kdray.final import run_final
    from kdray.report import write_report
    from kdray.tracking import wandb_mode_of

    wandb_mode = wandb_mode_of(args.wandb)
    task = load_data(cfg.data)
    plan = start(cfg, args.address)
    run = RunDir(run_dir)
    best = yaml.safe_load(run.best_config.read_text())
    teacher, inputs, students = teacher_and_inputs(cfg, task, plan, run.root)
    run_final(cfg, task, run, teacher, inputs, students, best, seeds=args.seeds)
    write_report(run_dir, wandb_mode=wandb_mode)
    return 0


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
