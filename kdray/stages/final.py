"""Final stage: retrain the search's best configuration, benchmark it against the teacher and the
seeds' baselines, and hand over a deployable student.

1. The best configuration (validation only) is retrained with `final.seeds` seeds, beside the
   two baselines of the seeds with the same budget, data, alpha, T, learning rate and epochs:
   the same LoRA student without KD (`alpha=1`) and the frozen-encoder,
   head-only student. They are Tune trials of the search's own trainable, so they
   run `final.seeds x 3` at `search.concurrency` through the trial engine.
2. The seed with the best validation accuracy is kept; its LoRA weights are merged
   (`merge_and_unload`) and the student is saved with its tokenizer and label names under
   `final/student/`, loadable by `transformers.pipeline("text-classification", model=...)`;
   its unmerged PEFT adapter goes to `final/adapter/`.
3. The test split is read here, once. Every model is scored on it; the teacher, the merged and
   unmerged student and the baselines are benchmarked one after another in this process on the
   same inputs (latency at batch 1, throughput at batch 32, peak memory, size).
4. Error analysis of the student's test mistakes: short/long, negation, true->predicted.
5. The student as it is served (`kdray.stages.serving`): its ONNX fp32 and int8 forms beside
   `final/student/`, each checked against PyTorch's logits on validation; every form of the
   student and the teacher benchmarked where it runs, tokenization included, and scored on the
   same read of the test split; the form to ship recommended (`serve.runtime`).

`final/final.json` holds every measurement and `final/predictions.parquet` the test predictions;
`kdray.report.write` turns them into `results.json`, `report.md` and `plots/`.

    kdray final --run runs/NAME [--seeds N]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdray import metrics as M
from kdray.artifacts import FinalRecord, RunDir, SearchChoice, load_trials
from kdray.config import RunConfig
from kdray.evaluate.benchmark import BENCHMARKED, Measured, load_trained, measure_models
from kdray.evaluate.error_analysis import error_analysis
from kdray.evaluate.scores import mean_std, split_scores, truncation_stats
from kdray.trials import VARIANTS, TrialConfig


if TYPE_CHECKING:  # torch loads when the stage runs
    from torch import nn




def final_cases(cfg: RunConfig, chosen: TrialConfig, num_labels: int, seeds: int) -> list[TrialConfig]:
    """The final runs: the search's choice and each baseline, per seed, each with its
    `trainable_params` counted exactly as the budget counts it."""
    from kdray.train.budget import count

    variants = {"student": {}}
    if cfg.final.baselines:
        variants.update({"no_kd": {"alpha": 1.0}, "head_only": {"mode": "head"}})
    cases = []
    # Variant by variant, the cheap head-only runs last: they fill the slots the last long runs
    # leave idle instead of a long run finishing alone.
    for variant, change in variants.items():
        for seed in cfg.repeat_seeds(seeds):
            case = dataclasses.replace(chosen, **change, variant=variant, seed=seed)
            cases.append(dataclasses.replace(case, trainable_params=count(case.student(cfg.student), num_labels)))
    return cases


def train_cases(cfg: RunConfig, job: Any, data: Any, cases: list[TrialConfig], storage: str,
                plan: Any) -> list[tuple[TrialConfig, str]]:
    """Train every case as a Tune trial of the engine, each holding what `plan` (the students'
    `kdray.runtime.resources.Plan`) gives a trial (Tune experiment and checkpoints under `storage`);
    returns `(case, last checkpoint path)` per case."""
    from ray import tune

    from kdray.runtime.cluster import storage_join
    from kdray.runtime.engine import checkpoint_path, distill_spec, tune_run_config, tune_trainable
    from kdray.runtime.progress import Progress

    spec = distill_spec(cfg, job, data, storage_join(storage, "train"), plan.resources)
    progress = Progress(total=len(cases), concurrency=cfg.search.concurrency, by_variant=True)
    tuner = tune.Tuner(
        tune_trainable(spec),
        param_space={"trial": tune.grid_search([case.to_tune() for case in cases])},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.search.concurrency, reuse_actors=cfg.search.reuse_actors),
        run_config=tune_run_config("tune", storage, keep=1, max_failures=cfg.search.max_failures, callbacks=[progress]),
    )
    out = []
    for r in tuner.fit():
        case, path = TrialConfig.of_tune(r.config), checkpoint_path(r)
        if r.error is not None or path is None:
            raise RuntimeError(f"final stage: the {case.variant} run with seed {case.seed} failed: {r.error}")
        out.append((case, path))
    return out


def search_checkpoint(run: RunDir, best: SearchChoice) -> str | None:
    """The chosen search trial's last checkpoint, when that trial trained all its epochs.

    It is the final stage's student run for the run's own seed: same configuration, seed, data
    and code, so retraining it would only repeat it (bit for bit on CPU; the smoke test checks
    it). None when the trial stopped early, or its checkpoint is not where it was written."""
    row = next((r for r in load_trials(run) if r.trial_id == best.trial_id), None)
    path = None if row is None else row.checkpoint_path
    if path is None or row.status != "completed" or ("://" not in path and not Path(path).is_dir()):
        return None
    return path


def save_student(unmerged: nn.Module, tokenizer: Any, run: RunDir, cfg: RunConfig, case: TrialConfig,
                 label_names: list[str]) -> Path:
    """Save the PEFT adapter (`final/adapter/`), then merge the LoRA weights and save the student
    as a plain Hugging Face classifier with its tokenizer (`final/student/`)."""
    from kdray.train.models import merged

    unmerged.save_pretrained(run.adapter)
    student_dir = run.student
    merged(unmerged).save_pretrained(student_dir, safe_serialization=True)
    tokenizer.save_pretrained(student_dir)
    (student_dir / "kdray.json").write_text(json.dumps({
        "run": cfg.name, "seed": case.seed, M.TRAINABLE_PARAMS: case.trainable_params,
        "label_names": label_names, "max_length": cfg.data.max_length}, indent=2))
    return student_dir


def run_final(cfg: RunConfig, task: Any, run: RunDir, teacher: Any, inputs: tuple[Any, Any], plan: Any,
              best: SearchChoice, *, seeds: int | None = None) -> FinalRecord:
    """Retrain, select on validation, save the merged student, score on test, benchmark.

    `teacher` is the teacher stage's `TeacherResult`, `inputs` the distillation inputs `(job,
    data)` the search trained on, `plan` the students' `kdray.runtime.resources.Plan`, `best` the
    search's choice. Ray must be running (`kdray.runtime.cluster.start`)."""
    t_start = time.perf_counter()
    seeds = seeds if seeds is not None else cfg.final.seeds
    if run.final.exists():
        print(f"final: replacing the earlier final stage in {run.final}")
        shutil.rmtree(run.final)
    run.final.mkdir(parents=True)
    job, data = inputs
    t0 = time.perf_counter()
    trained, reused = _retrain(cfg, task, run, job, data, plan, best, seeds)
    train_seconds = time.perf_counter() - t0
    test = task.read_test("final")  # the test split is read here and nowhere else
    measured, where, s_test, t_test = _measure(cfg, task, test, teacher, job, data, plan, trained)
    s_tok = _tokenizer(cfg.student)
    case, path = measured.chosen["student"]
    with local_checkpoints([(case, path)]) as ((_, local),):
        student_dir = save_student(load_trained(job, case, local, data.student_base)[0], s_tok, run, cfg, case,
                                   task.label_names)
    errors = _errors_and_predictions(cfg, task, test, s_test, t_test, measured, run)
    serving = _serve(cfg, task, test, run, teacher, plan)
    record = FinalRecord(
        seeds=seeds, device=where["device_name"], device_type=where["device_type"], placement=where,
        reused_search_trial=best.trial_id if reused else None, train_seconds=train_seconds,
        seconds=time.perf_counter() - t_start,
        data={"description": task.description, "label_names": task.label_names,
              "sizes": {**{name: len(df) for name, df in task.splits.items()}, "test": len(test),
                        **({"transfer": len(task.transfer)} if task.transfer is not None else {})},
              "test_reads": list(task.test_reads), **truncation_stats(test, s_tok, cfg.data.max_length)},
        teacher={"val": {kk: teacher.record[kk] for kk in (M.VAL_ACCURACY, M.VAL_F1)},
                 **split_scores(measured.logits["teacher"], t_test.labels, task.num_labels),
                 "model": teacher.record.get("model"), "epochs": teacher.record.get("epochs"),
                 "train_examples": teacher.record.get("train_examples")},
        variants={v: {"description": VARIANTS[v], M.TRAINABLE_PARAMS: rs[0][M.TRAINABLE_PARAMS],
                      "chosen_seed": measured.chosen[v][0].seed, "runs": rs,
                      **{key: mean_std([r[key] for r in rs]) for key in
                         (M.VAL_ACCURACY, M.TEST_ACCURACY, M.TEST_F1, M.TEST_PRECISION, M.TEST_RECALL)}}
                  for v, rs in measured.runs.items()},
        benchmark=measured.benchmark, merge_max_abs_logit_diff=measured.merge_diff, error_analysis=errors,
        student_dir=str(student_dir), adapter_dir=str(run.adapter), serving=serving)
    record.save(run)
    print(f"final: done in {record.seconds:.0f}s; merged vs unmerged logits differ by at most "
          f"{measured.merge_diff:.2e}; student saved to {student_dir}")
    return record


def _serve(cfg: RunConfig, task: Any, test: Any, run: RunDir, teacher: Any, plan: Any) -> dict[str, Any]:
    """The student's ONNX forms, checked, then every served form benchmarked and scored on this
    stage's read of the test split (`kdray.stages.serving`); nothing when `serve.export` is off."""
    if not cfg.serve.export:
        return {}
    from kdray.stages.serving import export_student, measure_forms

    return measure_forms(cfg, test, run, teacher.model_dir, plan, export_student(cfg, task, run))


def _retrain(cfg: RunConfig, task: Any, run: RunDir, job: Any, data: Any, plan: Any, best: SearchChoice,
             seeds: int) -> tuple[list[tuple[TrialConfig, str]], bool]:
    """Every final run `(case, checkpoint)`, and whether the student's own-seed run is the
    search's chosen trial (not retrained: it would repeat it)."""
    from kdray.runtime.cluster import storage_join, storage_root

    cases = final_cases(cfg, best.config, task.num_labels, seeds)
    reused = []
    searched = search_checkpoint(run, best)
    if searched is not None:
        case = next(c for c in cases if c.variant == "student" and c.seed == cfg.seed)
        cases.remove(case)
        reused.append((case, searched))
        print(f"final: the student's seed {cfg.seed} run is the search's trial {best.trial_id} (same configuration "
              f"and seed: a retrain would repeat it)")
    print(f"final: retraining the best configuration with {seeds} seed(s)"
          f"{' beside the no-KD and head-only baselines' if cfg.final.baselines else ''}: {len(cases)} runs")
    storage = storage_join(storage_root(cfg, run.root), run.final.name)
    return reused + (train_cases(cfg, job, data, cases, storage, plan) if cases else []), bool(reused)


def _tokenizer(spec: Any) -> Any:
    from kdray.train.models import load_tokenizer

    return load_tokenizer(spec)


def _measure(cfg: RunConfig, task: Any, test: Any, teacher: Any, job: Any, data: Any, plan: Any,
             trained: list[tuple[TrialConfig, str]]) -> tuple[Measured, dict[str, Any], Any, Any]:
    """Score and benchmark on the students' kind of device (`measure_models` in a Ray task)."""
    from kdray.data.tokenize import tokenize
    from kdray.runtime.tasks import on_device
    from kdray.train.batches import Split
    from kdray.train.models import from_pretrained_dir, to_payload

    s_tok, t_tok = _tokenizer(cfg.student), _tokenizer(cfg.teacher)
    s_test, t_test = (Split.from_dataset(tokenize(task, tok, cfg.data.max_length, cfg.cache_dir, test=test)[0]["test"])
                      for tok in (s_tok, t_tok))
    print(f"final: scoring and benchmarking on {'a GPU' if plan.on_gpu else 'CPUs'} of the cluster: {len(s_test)} test "
          f"examples, batch 1 x {cfg.final.latency_runs} and batch {cfg.final.throughput_batch_size}")
    measured, where = on_device(plan, _measure_task, job, data.student_base, trained, s_test, t_test,
                                to_payload(from_pretrained_dir(teacher.model_dir)), t_tok.pad_token_id, cfg)
    print(f"final: measured on {where['device_name']}")
    for name, b in measured.benchmark.items():
        b["description"] = BENCHMARKED[name]
        print(f"  {name:<17} p50 {b['latency_ms_p50']:7.2f} ms  p95 {b['latency_ms_p95']:7.2f} ms"
              f"  {b['throughput_per_s']:8.1f}/s  {b['size_mb']:7.1f} MB  peak memory {b['peak_memory_mb']:.0f} MB")
    return measured, where, s_test, t_test


def _measure_task(device: Any, job: Any, base: Any, trained: list[tuple[TrialConfig, str]], *args: Any) -> Measured:
    """The measuring task's body: the runs' checkpoints (local paths or a storage URI) as local
    directories, then `measure_models`. What it chose is named by the original paths."""
    with local_checkpoints(trained) as local:
        measured = measure_models(device, job, base, local, *args)
    paths = {str(d): p for (_, d), (_, p) in zip(local, trained)}
    measured.chosen = {v: (case, paths[str(d)]) for v, (case, d) in measured.chosen.items()}
    return measured


@contextlib.contextmanager
def local_checkpoints(trained: list[tuple[TrialConfig, str]]) -> Any:
    """Each run's checkpoint as a local directory (a storage URI is downloaded) while the block runs."""
    from ray.train import Checkpoint

    with contextlib.ExitStack() as stack:
        yield [(case, Path(stack.enter_context(Checkpoint(path).as_directory()))) for case, path in trained]


def _errors_and_predictions(cfg: RunConfig, task: Any, test: Any, s_test: Any, t_test: Any, measured: Measured,
                            run: RunDir) -> dict[str, Any]:
    """The shipped student's error analysis, and `final/predictions.parquet`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    s_logits, t_logits = measured.logits["student"], measured.logits["teacher"]
    s_prob = torch.softmax(torch.tensor(s_logits), -1).numpy().max(-1)
    s_pred, t_pred = s_logits.argmax(-1), t_logits.argmax(-1)
    texts = list(test["text"])
    errors = error_analysis(texts, s_test.labels, s_pred, s_prob, t_pred, task.label_names,
                            cfg.final.examples_per_bucket)
    pq.write_table(pa.table({"example_id": s_test.example_ids, "text": texts, "label": s_test.labels,
                             "student_pred": s_pred, "student_prob": s_prob.astype(np.float32),
                             "teacher_pred": t_pred}), run.predictions)
    return errors
