"""The pipeline: the stages of a run, in order, each called once (the way a torchtune recipe's
main owns its lifecycle).

    data -> cluster and plan -> shapes -> teacher -> distillation inputs -> search -> final -> report

`run` is `kdray search`; `final_again` (`kdray final --run`) and `distill_seeds` (`kdray
distill`) are the same order from a later point. No stage calls another: each takes what the ones
before returned (typed artefacts, `kdray.artifacts`) and returns its own.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from kdray.artifacts import RunDir, SearchChoice


@dataclasses.dataclass(frozen=True)
class Options:
    """How `kdray search` runs the pipeline (its flags)."""

    address: str | None = None
    """The Ray cluster to join (`--address`), else a local Ray."""
    resume: bool = False
    overwrite: bool = False
    """Delete the run of this name first (once every input has been checked)."""
    wandb_mode: str = "disabled"
    final: bool = True
    """Run the final stage and the report after the search (`--no-final`: False)."""


def run(cfg: Any, run_dir: RunDir, opts: Options) -> None:
    """`kdray search`: every stage once, in order. Bad data and a budget no student meets exit 2
    before Ray starts; so does a placement this machine can never hold (`kdray.runtime.cluster.start`)."""
    from kdray.data.load import load_data

    task = load_data(cfg.data)  # bad data exits 2 here, before torch, Ray or Tune is imported
    n_layers = _before_ray(cfg, task, run_dir, opts)
    from kdray.config import to_dict
    from kdray.report.write import write_report
    from kdray.runtime.cluster import start, warn_if_storage_is_local
    from kdray.stages.final import run_final
    from kdray.stages.inputs import distill_inputs
    from kdray.stages.search import run_search, summarize, wandb_callback
    from kdray.stages.teacher import prepare_teacher

    wandb = wandb_callback(opts.wandb_mode, cfg, run_dir)  # before Ray: WANDB_MODE reaches its workers
    plan = start(cfg, opts.address)
    print(f"data: {task.description}")
    run_dir.save_config(to_dict(cfg))
    warn_if_storage_is_local(cfg)
    shapes = _shapes(cfg, task, plan)
    teacher = prepare_teacher(cfg, task, plan=plan.teacher, storage_path=_train_storage(cfg, run_dir))
    inputs = distill_inputs(cfg, task, teacher)
    students = _size_students(cfg, plan, inputs)
    result = run_search(cfg, task, run_dir, n_layers, inputs, students, resume=opts.resume, wandb=wandb, shapes=shapes)
    summarize(result, cfg, run_dir)
    _after_search(run_dir, opts)
    if not opts.final:
        return
    if result.best is None:
        raise RuntimeError("no trial reported a validation accuracy: nothing for the final stage to retrain")
    run_final(cfg, task, run_dir, teacher, inputs, students, result.best)
    write_report(run_dir.root, wandb_mode=opts.wandb_mode)


def _before_ray(cfg: Any, task: Any, run_dir: RunDir, opts: Options) -> int:
    """What needs the data but not Ray: the budget's floor, the student's depth, what the run
    derived (printed), and `--overwrite`. Returns the student's encoder depth."""
    from kdray.stages.search import describe
    from kdray.train.budget import require_feasible
    from kdray.train.models import encoder_count

    require_feasible(cfg, task.num_labels)
    if opts.overwrite and run_dir.root.exists():
        print(f"--overwrite: deleting the earlier run {run_dir.root}")
        shutil.rmtree(run_dir.root)
    n_layers = encoder_count(cfg.student, task.num_labels)
    describe(cfg, task.num_labels, n_layers)
    return n_layers


def _shapes(cfg: Any, task: Any, plan: Any) -> Any:
    """The student shapes, timed on the students' device, when shapes are searched or latency is
    budgeted (a latency budget no shape meets exits 2 here, before Tune); else None."""
    if not (cfg.space.keep_layers or cfg.search.latency_budget_ms is not None or cfg.search.min_speedup is not None):
        return None
    from kdray.stages.shapes import describe_shapes, measure

    shapes = measure(cfg, task, plan.students)
    describe_shapes(shapes, cfg)
    return shapes


def _after_search(run_dir: RunDir, opts: Options) -> None:
    from kdray.wandb_setup import wandb_sync_hint

    if opts.wandb_mode == "offline":
        print(wandb_sync_hint(run_dir.wandb))
    if not opts.final:
        print(f"final stage skipped (--no-final); run it with: kdray final --run {run_dir.root}")


def _train_storage(cfg: Any, run_dir: RunDir) -> str:
    from kdray.runtime.cluster import storage_join, storage_root

    return storage_join(storage_root(cfg, run_dir.root), "train")


def _size_students(cfg: Any, plan: Any, inputs: tuple[Any, Any]) -> Any:
    """The students' plan with their GPU share (the memory probe, on GPUs), printed."""
    from kdray.runtime.tasks import size_students
    from kdray.stages.search import largest_student

    job, data = inputs
    students = size_students(plan.students, dataclasses.replace(job, model=largest_student(cfg)), data,
                             cfg.search.concurrency)
    print(students.line(cfg.train.precision), flush=True)
    return students


def teacher_and_inputs(cfg: Any, task: Any, plan: Any, run_root: Path) -> tuple[Any, tuple[Any, Any], Any]:
    """The teacher stage (cached), the distillation inputs `(job, data)` every student trial
    shares, and the students' plan sized by the memory probe: `run`'s order, for the commands
    that start after the search (`final_again`) or train one configuration (`distill_seeds`)."""
    from kdray.stages.inputs import distill_inputs
    from kdray.stages.teacher import prepare_teacher

    teacher = prepare_teacher(cfg, task, plan=plan.teacher, storage_path=_train_storage(cfg, RunDir(run_root)))
    inputs = distill_inputs(cfg, task, teacher)
    return teacher, inputs, _size_students(cfg, plan, inputs)


def final_again(cfg: Any, task: Any, run: RunDir, plan: Any, best: SearchChoice, *, seeds: int | None,
                wandb_mode: str) -> None:
    """`kdray final --run DIR`: the teacher (cached), the distillation inputs, the final stage and
    the report of a finished search, again, in the pipeline's order."""
    from kdray.report.write import write_report
    from kdray.stages.final import run_final

    teacher, inputs, students = teacher_and_inputs(cfg, task, plan, run.root)
    run_final(cfg, task, run, teacher, inputs, students, best, seeds=seeds)
    write_report(run.root, wandb_mode=wandb_mode)


def distill_seeds(cfg: Any, task: Any, plan: Any, run_dir: Path, seeds: range) -> Any:
    """`kdray distill`: the teacher (cached), then `cfg`'s student trained once per seed (one Tune
    trial each, the students' plan); yields each run's per-epoch history as it ends."""
    import json

    import ray

    from kdray.runtime.engine import TrialSpec, distill_entry, run_one

    _, (job, data), students = teacher_and_inputs(cfg, task, plan, run_dir)
    shared = ray.put(data)
    for seed in seeds:
        spec = TrialSpec(distill_entry, dataclasses.replace(job, seed=seed), shared, students.resources,
                         str(run_dir / "train"))
        result = run_one(spec, "distill")
        with result.checkpoint.as_directory() as d:
            yield json.loads((Path(d) / "state.json").read_text())["history"]
