"""Search stage: the budget-constrained Ray Tune + Optuna + ASHA search (`run_search`).

Each Optuna sample is counted on the meta device while it is drawn; one over budget is told to
the sampler (an Optuna constraint plus the worst value) and replaced by a new sample before it
ever becomes a Tune trial, so no device time goes to it. Trials run through the trial engine
(`kdray.runtime.engine`); ASHA stops weak ones early on `val/accuracy` per epoch. The main command,
`python -m kdray.search`, is `kdray.stages.pipeline`: teacher, this search, the final stage, the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import TYPE_CHECKING, Any

from kdray import metrics as M
from kdray.artifacts import RunDir, SearchChoice, SearchResult, SearchSummary, TrialRow, status_counts
from kdray.config import RunConfig, StudentConfig, student_shapes
from kdray.errors import Interrupted
from kdray.runtime.cluster import NODE_ID
from kdray.runtime.interrupts import tune_interrupts
from kdray.train.budget import head_cost, rank_limit
from kdray.trials import TrialConfig


if TYPE_CHECKING:
    from kdray.stages.shapes import ShapeTable




def trial_rows(results: Any, budget: int, interrupted: bool = False, runtime: str | None = None) -> list[TrialRow]:
    """One `TrialRow` per trial of a Tune `ResultGrid`. A trial that did not end (the search was
    interrupted: Tune stops its loop and leaves it unfinished) is `interrupted`, not `stopped
    early`: `--resume` continues it. `runtime`: the form the shapes' latencies were measured in."""
    from kdray.runtime.engine import checkpoint_path

    rows = []
    for r in results:
        c, last = TrialConfig.of_tune(r.config), r.metrics or {}
        df = r.metrics_dataframe
        per_epoch = _per_epoch(df)
        accuracy = [float(x) for x in per_epoch[M.VAL_ACCURACY]] if per_epoch is not None else []
        epochs_run = int(per_epoch[M.EPOCHS_DONE].max()) if accuracy else 0
        rows.append(TrialRow(
            trial_id=last.get("trial_id") or r.path.rsplit("_", 2)[-2], config=c,
            status=_status(r, epochs_run, c.epochs, interrupted),
            val_accuracy_per_epoch=accuracy,
            val_f1_macro_per_epoch=[float(x) for x in per_epoch[M.VAL_F1]] if per_epoch is not None else [],
            train_loss_per_epoch=[float(x) for x in per_epoch[M.TRAIN_LOSS]] if per_epoch is not None else [],
            epochs_run=epochs_run, reported_trainable_params=int(last.get(M.TRAINABLE_PARAMS, -1)),
            within_budget=c.trainable_params <= budget, latency_ms=r.config.get(M.LATENCY_MS),
            latency_runtime=runtime if r.config.get(M.LATENCY_MS) is not None else None,
            wall_time_s=float(last.get("time_total_s", float("nan"))), node=last.get(NODE_ID),
            placement=json.loads(last[M.PLACEMENT]) if last.get(M.PLACEMENT) else None,
            gpu_busy_pct=_mean(df[M.GPU_BUSY].dropna()) if df is not None and M.GPU_BUSY in df else None,
            checkpoint_path=checkpoint_path(r)))
    return rows


def _per_epoch(df: Any) -> Any:
    """A trial's evaluated epochs, one row each. A trial retried after a failure can report an
    epoch twice (its checkpoint was written but the result never reached Tune, or it restored
    from its last epoch and Tune repeats that result as the final one): the last report wins."""
    if df is None or M.VAL_ACCURACY not in df:
        return None
    evaluated = df.dropna(subset=[M.VAL_ACCURACY])
    return evaluated.drop_duplicates(subset=[M.EPOCHS_DONE], keep="last").sort_values(M.EPOCHS_DONE)


def _status(result: Any, epochs_run: int, epochs: int, interrupted: bool) -> str:
    if result.error is not None:
        return "failed"
    if epochs_run >= epochs:
        return "completed"
    # A search that was interrupted leaves its running trials unfinished: their last result is
    # not the one Tune ends a trial on (`done`).
    return "interrupted" if interrupted and not (result.metrics or {}).get("done") else "stopped early"


def _mean(values: Any) -> float | None:
    return float(values.mean()) if len(values) else None


def gpu_busy(results: Any) -> dict[str, Any]:
    """How busy each GPU the trials held was, from the trials' own samples (`kdray.runtime.devices.GpuBusy`):
    per (node, GPU id), the mean of its trials' per-epoch means; or why there is none."""
    import json

    per_gpu: dict[str, list[float]] = {}
    why = set()
    for r in results:
        df = r.metrics_dataframe
        if df is None:
            continue
        if M.GPU_BUSY_WHY in df:
            why |= set(df[M.GPU_BUSY_WHY].dropna())
        if M.GPU_BUSY not in df or M.PLACEMENT not in df:
            continue
        rank0 = json.loads(df[M.PLACEMENT].dropna().iloc[-1])[0]
        key = f"{rank0['node_id'][:12]}:{','.join(rank0['gpu_ids'])}"
        per_gpu.setdefault(key, []).extend(float(x) for x in df[M.GPU_BUSY].dropna())
    if not per_gpu:
        return {"gpu_busy_mean_pct": None, "why": "; ".join(sorted(why)) or "no trial held a CUDA GPU"}
    means = {k: sum(v) / len(v) for k, v in per_gpu.items()}
    return {"gpu_busy_mean_pct": sum(means.values()) / len(means), "gpu_busy_per_gpu_pct": means}


def best_config(rows: list[TrialRow], cfg: RunConfig) -> SearchChoice | None:
    """The trial with the best validation accuracy (any epoch; ties: fewer trainable parameters);
    validation only, never test."""
    scored = [r for r in rows if r.best_val_accuracy is not None and r.status != "failed"]
    if not scored:
        return None
    b = max(scored, key=lambda r: (r.best_val_accuracy, -r.config.trainable_params))
    return SearchChoice(b.trial_id, b.best_val_accuracy, b.config, cfg.budget)


def largest_student(cfg: RunConfig) -> StudentConfig:
    """The space's most memory-hungry student: its largest rank on its largest module set, every
    layer, DoRA when the space has it (a trained magnitude per module, and its weight norms each step)."""
    from kdray.config import LoraChoice

    sp = cfg.space
    lora = LoraChoice(r=max(sp.lora_r), lora_alpha=max(sp.lora_alpha), lora_dropout=sp.lora_dropout[0],
                      target_modules=max(sp.target_modules, key=len), layers=None,
                      variant="dora" if "dora" in sp.lora_variant else sp.lora_variant[0])
    return dataclasses.replace(cfg.student, mode="lora", lora=lora, keep_layers=max(student_shapes(cfg), key=_depth))


def _depth(shape: list[int] | None) -> float:
    return float("inf") if shape is None else len(shape)


def describe(cfg: RunConfig, num_labels: int, n_layers: int) -> None:
    """Print what the run derived: head cost, largest feasible rank per module set, trials, device."""
    s = cfg.student
    head = head_cost(s, num_labels)
    print(f"budget: {cfg.budget:,} trainable parameters; the head alone costs {head:,}")
    layers = "each layer in or out" if cfg.space.layers == "subset" else "all layers"
    print(f"student: {s.name or 'inline ' + s.config['model_type'] + ' config'}, {n_layers} layers{s.start_text()} "
          f"({layers}); largest rank within budget with all {n_layers} layers:")
    for ts in cfg.space.target_modules:
        # A variant changes what a choice costs besides its rank (DoRA's magnitudes), not the cost per rank.
        limits = {v: rank_limit(dataclasses.replace(s, lora=dataclasses.replace(s.lora, variant=v)), num_labels, ts, None)
                  for v in cfg.space.lora_variant}
        lim = limits[cfg.space.lora_variant[0]]
        r = lim.max_rank(cfg.budget)
        ok = [x for x in cfg.space.lora_r if r is not None and x <= r]
        other = {v: x.max_rank(cfg.budget) for v, x in limits.items() if x.max_rank(cfg.budget) != r}
        per_variant = f" ({', '.join(f'{v} {m or 0}' for v, m in other.items())})" if other else ""
        print(f"  {','.join(ts):<24} {lim.per_rank:>8,}/rank  max r {r if r is not None else 'none':>5}{per_variant}  "
              f"space ranks that fit: {ok or 'none (need fewer layers)'}")
    workers = cfg.resources.workers
    where = "in the trial's own process" if workers == 1 else f"on {workers} Ray Train (DDP) workers"
    # The device each trial gets is printed once Ray is up (`kdray.runtime.resources.Plan.line`).
    print(f"search: {cfg.search.trials} trials, {cfg.search.concurrency} at a time, epochs {cfg.space.epochs}, "
          f"ASHA grace {cfg.search.grace_period} / factor {cfg.search.reduction_factor}; each trial trains {where}")


def wandb_callback(mode: str, cfg: RunConfig, run: RunDir) -> Any:
    """One wandb run per trial, grouped by run name, logged from the driver
    (`kdray.runtime.tracking.WandbTrials`); None when disabled."""
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    from kdray.runtime.tracking import WandbTrials

    return WandbTrials(cfg.name, run.root)


def run_search(cfg: RunConfig, task: Any, run: RunDir, n_layers: int, inputs: tuple[Any, Any], plan: Any, *,
               resume: bool = False, wandb: Any = None, shapes: ShapeTable | None = None) -> SearchResult:
    """The Tune search over `task` (the data stage's `TaskData`) with the distillation `inputs`
    `(job, data)`, each trial holding what `plan` (the students' `kdray.runtime.resources.Plan`) gives
    it; writes trials.parquet and best_config.yaml. Ray must be running (`kdray.runtime.cluster.start`);
    `wandb` is `wandb_callback`'s, made before Ray started (or None); `shapes` the measured
    student shapes (`kdray.stages.shapes.measure`), when shapes are searched or latency is budgeted."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from kdray.console import quiet_optuna
    from kdray.runtime.cluster import storage_join, storage_root
    from kdray.runtime.engine import distill_spec, tune_run_config, tune_trainable
    from kdray.runtime.progress import Progress
    from kdray.stages.searcher import BudgetedSpace, count_rejected, make_searcher

    quiet_optuna()
    t0 = time.perf_counter()
    storage = storage_root(cfg, run.root)
    job, data = inputs
    spec = distill_spec(cfg, job, data, storage_join(storage, "train"), plan.resources)
    run.search.mkdir(parents=True, exist_ok=True)
    callbacks = [Progress(total=cfg.search.trials, concurrency=cfg.search.concurrency)] + ([wandb] if wandb is not None else [])
    run_config = tune_run_config("search", storage, keep=2, max_failures=cfg.search.max_failures, callbacks=callbacks)
    if resume:
        tuner = tune.Tuner.restore(storage_join(storage, "search"), trainable=tune_trainable(spec),
                                   resume_errored=True)
    else:
        space = BudgetedSpace(cfg.space, cfg.student, task.num_labels, cfg.budget, n_layers,
                              latency=shapes.latency_of() if shapes else None, limit_ms=shapes.limit_ms if shapes else None)
        scheduler = ASHAScheduler(time_attr=M.EPOCHS_DONE, max_t=max(cfg.space.epochs),
                                  grace_period=cfg.search.grace_period, reduction_factor=cfg.search.reduction_factor)
        tuner = tune.Tuner(
            tune_trainable(spec),
            tune_config=tune.TuneConfig(metric=M.VAL_ACCURACY, mode="max", search_alg=make_searcher(cfg, space, run.optuna_url),
                                        scheduler=scheduler, num_samples=cfg.search.trials,
                                        max_concurrent_trials=cfg.search.concurrency,
                                        reuse_actors=cfg.search.reuse_actors),
            run_config=run_config,
        )
    with tune_interrupts() as signals:
        grid = tuner.fit()
    interrupted = signals.code is not None
    rows = trial_rows(grid, cfg.budget, interrupted, shapes.runtime if shapes else None)
    summary = SearchSummary(time.perf_counter() - t0, count_rejected(run.optuna_url, cfg.name), len(rows),
                            list(task.test_reads), gpu_busy(grid), interrupted)
    result = SearchResult(rows, best_config(rows, cfg), summary)
    result.save(run)
    if interrupted:
        summarize(result, cfg, run)
        raise Interrupted(signals.code, f"search interrupted; what finished is kept. Continue it with: kdray search "
                                        f"--name {cfg.name} --output-dir {run.root.parent} --resume")
    return result


def summarize(result: SearchResult, cfg: RunConfig, run: RunDir) -> None:
    counts = status_counts(result.rows)
    line = (f"search done in {result.summary.seconds:.0f}s: {counts['completed']} completed, "
            f"{counts['stopped early']} stopped early, {counts['failed']} failed, {result.summary.rejected} infeasible "
            f"configs (over budget, too slow, or no layer) rejected before training")
    if counts["interrupted"]:
        line = line.replace("search done", "search interrupted") + (
            f"; {counts['interrupted']} interrupted: "
            f"{', '.join(r.trial_id for r in result.rows if r.status == 'interrupted')}")
    print(line)
    b = result.best
    if b is None:
        print("no trial reported a validation accuracy")
        return
    c = b.config
    print(f"best: val accuracy {b.best_val_accuracy:.4f} with {c.trainable_params:,} trainable parameters "
          f"({100 * c.trainable_params / cfg.budget:.1f}% of budget): alpha {c.alpha:.3f}, "
          f"T {c.temperature:.2f}, lr {c.learning_rate:.2e}, {c.lora.variant} r {c.lora.r}, lora_alpha {c.lora.lora_alpha:g}, "
          f"targets {','.join(c.lora.target_modules)}, layers {c.layers_text}")
    print(f"wrote {run.trials} and {run.best_config}")
