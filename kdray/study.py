"""Search stage: the budget-constrained Ray Tune + Optuna + ASHA search (`run_search`).

Each Optuna sample is counted on the meta device while it is drawn; one over budget is told to
the sampler (an Optuna constraint plus the worst value) and replaced by a new sample before it
ever becomes a Tune trial, so no device time goes to it. Trials run through the trial engine
(`kdray.engine`); ASHA stops weak ones early on `val/accuracy` per epoch. The main command,
`python -m kdray.search`, is `kdray.pipeline`: teacher, this search, the final stage, the report.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from ray.tune.search.optuna import OptunaSearch

from kdray import metrics as M
from kdray.budget import count, head_cost, rank_limit
from kdray.cluster import NODE_ID
from kdray.config import RunConfig, SpaceConfig, StudentConfig, student_shapes
from kdray.rundir import RunDir
from kdray.trials import (LAYER_PREFIX, REJECTED_ATTR, REJECTED_WHY_ATTR, SHAPE_PARAM, TrialConfig, shape_text,
                          status_counts)

if TYPE_CHECKING:
    from kdray.shapes import ShapeTable

METRIC, MODE = M.VAL_ACCURACY, "max"


# ----------------------------------------------------------------------------- the space


class BudgetedSpace:
    """Optuna define-by-run space that counts each sample's trainable parameters.

    Module-level and picklable (Tune saves the searcher for resume). It does no computation
    besides the count (a meta-device build, milliseconds). An over-budget sample gets a positive
    Optuna constraint value and `feasible: False`; `BudgetedOptunaSearch` then rejects it.
    `n_layers` is the student's encoder depth: one `layer_i` flag each when layers are searched.
    With `space.keep_layers` the shape is a parameter too; `latency` (shape text -> batch-1 ms,
    `kdray.shapes.ShapeTable.latency_of`) and `limit_ms` make a too-slow shape infeasible the
    same way (its own `latency` constraint), before it trains.
    """

    def __init__(self, space: SpaceConfig, student: StudentConfig, num_labels: int, budget: int, n_layers: int,
                 latency: dict[str | None, float] | None = None, limit_ms: float | None = None):
        self.space, self.student, self.num_labels = space, student, num_labels
        self.budget, self.n_layers = budget, n_layers
        self.latency, self.limit_ms = latency or {}, limit_ms

    def __call__(self, trial: Any) -> dict[str, Any]:
        sp = self.space
        trial.suggest_float("alpha", sp.alpha[0], sp.alpha[1])
        trial.suggest_float("temperature", sp.temperature[0], sp.temperature[1], log=sp.temperature[0] < sp.temperature[1])
        trial.suggest_float("learning_rate", sp.learning_rate[0], sp.learning_rate[1],
                            log=sp.learning_rate[0] < sp.learning_rate[1])
        trial.suggest_categorical("lora_r", sp.lora_r)
        trial.suggest_categorical("lora_alpha", sp.lora_alpha)
        trial.suggest_float("lora_dropout", sp.lora_dropout[0], sp.lora_dropout[1])
        trial.suggest_categorical("target_modules", [",".join(t) for t in sp.target_modules])
        trial.suggest_categorical("epochs", sp.epochs)
        if sp.layers == "subset":
            for i in range(self.n_layers):
                trial.suggest_categorical(f"{LAYER_PREFIX}{i}", [True, False])
        if sp.keep_layers:
            trial.suggest_categorical(SHAPE_PARAM, [shape_text(shape) for shape in sp.keep_layers])
        choice = TrialConfig.from_params(trial.params)
        # No layer chosen is not a LoRA student at all: it counts as over budget.
        no_layer = not choice.lora.layers and choice.lora.layers is not None
        n = 0 if no_layer else count(choice.student(self.student), self.num_labels)
        # Feasible when <= 0: trainable parameters over budget.
        trial.set_constraint("budget", float(n - self.budget) if n else 1.0)
        trial.set_user_attr(M.TRAINABLE_PARAMS, n)
        out: dict[str, Any] = {M.TRAINABLE_PARAMS: n}
        latency = self.latency.get(shape_text(choice.keep_layers))
        too_slow = latency is not None and self.limit_ms is not None and latency > self.limit_ms
        if latency is not None:
            trial.set_user_attr(M.LATENCY_MS, latency)
            out[M.LATENCY_MS] = latency
            if self.limit_ms is not None:  # feasible when <= 0: milliseconds over the latency budget
                trial.set_constraint("latency", latency - self.limit_ms)
        over_budget = no_layer or n > self.budget
        if over_budget or too_slow:
            trial.set_user_attr(REJECTED_ATTR, True)
            trial.set_user_attr(REJECTED_WHY_ATTR, "budget" if over_budget else "latency")
        return {**out, "feasible": not (over_budget or too_slow)}


class BudgetedOptunaSearch(OptunaSearch):
    """OptunaSearch that never hands Tune an over-budget configuration, and tells the study what
    happened the way Optuna users read it (optuna-dashboard):

    - an infeasible sample is told at once as PRUNED, with its constraint (> 0) and parameter
      count set: TPE ranks it among the infeasible (its constraint counts), it is never a 0.0
      result, and it is replaced by a new sample;
    - a trial ASHA stopped is PRUNED, its per-epoch validation accuracies its intermediate
      values; a trial that ran all its epochs is COMPLETE with its last value.
    """

    max_rejections = 200

    def suggest(self, trial_id: str) -> dict | None:
        for _ in range(self.max_rejections):
            config = super().suggest(trial_id)
            if config is None or config.get("feasible", True):
                return config
            self._ot_study.tell(self._ot_trials.pop(trial_id), state=optuna.trial.TrialState.PRUNED)
        raise RuntimeError(f"{self.max_rejections} samples in a row were over the budget or too slow: narrow "
                           f"the space (smaller ranks, fewer modules or layers, faster shapes).")

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        stopped = (ot_trial is not None and not error and result is not None
                   and result.get(M.EPOCHS_DONE, 0) < int(ot_trial.params.get("epochs", 0)))
        if not stopped or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        try:
            # Tune skips the searcher for the result ASHA stopped on: it becomes the last
            # intermediate value here (Optuna ignores a step reported twice, with a warning).
            if result.get(self.metric) is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ot_trial.report(result[self.metric], result.get("training_iteration", 0))
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # after --resume the study may have closed it already
        self._completed_trials.add(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            # After --resume the study (SQLite) can be ahead of Tune's last snapshot: a trial it
            # already closed reports again. The study keeps its first verdict.
            pass


class TrainedStartupTPESampler(optuna.samplers.TPESampler):
    """TPE whose random start-up counts trials that trained, not rejected samples.

    TPE ends its start-up after `n_startup_trials` COMPLETE or PRUNED trials, and every sample
    kdray rejects (over budget, too slow) is told as PRUNED. Seen on the default space with three
    shapes and a 1.5x latency budget: 16 rejections of the too-slow shape used up the start-up,
    and TPE never once tried the 3-layer shape in 27 samples. So before each trial the start-up
    is lengthened by the rejections so far; the rejections still teach TPE (with their
    constraints) where the infeasible region is."""

    def __init__(self, *, n_startup_trials: int, **kwargs: Any):
        super().__init__(n_startup_trials=n_startup_trials, **kwargs)
        self.trained_startup = n_startup_trials

    def before_trial(self, study: optuna.Study, trial: Any) -> None:
        self._n_startup_trials = self.trained_startup + rejected(study)  # TPESampler's own start-up count
        super().before_trial(study, trial)


def make_searcher(cfg: RunConfig, space: BudgetedSpace, storage_url: str | None) -> Any:
    # Multivariate TPE handles the conditional, grouped space; constant_liar spreads parallel trials.
    sampler = TrainedStartupTPESampler(seed=cfg.seed, multivariate=True, group=True, constant_liar=True,
                                       n_startup_trials=startup_trials(cfg.search.trials, cfg.search.concurrency))
    kwargs = {"storage": _optuna_storage(storage_url)} if storage_url else {}
    searcher = BudgetedOptunaSearch(space=space, metric=METRIC, mode=MODE, sampler=sampler, study_name=cfg.name,
                                    **kwargs)
    searcher.max_rejections = cfg.search.max_rejections
    return searcher


def startup_trials(trials: int, concurrency: int) -> int:
    """TPE's random start-up: a third of the trials (at least one round of `concurrency`), so
    most of a small search is guided. Optuna's default of 10 would make an 8-trial search random."""
    return max(1, concurrency, trials // 3)


def _optuna_storage(url: str) -> Any:
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})


# ----------------------------------------------------------------------------- results


def trial_rows(results: Any, budget: int) -> list[dict[str, Any]]:
    """One row per trial: config, params, per-epoch val metrics, epochs run, status, wall time, node."""
    from kdray.engine import checkpoint_path

    rows = []
    for r in results:
        c, last = TrialConfig.of_tune(r.config), r.metrics or {}
        df = r.metrics_dataframe
        per_epoch = df.dropna(subset=[METRIC]) if df is not None and METRIC in df else None
        accuracy = [float(x) for x in per_epoch[METRIC]] if per_epoch is not None else []
        f1 = [float(x) for x in per_epoch[M.VAL_F1]] if per_epoch is not None else []
        epochs_run = int(per_epoch[M.EPOCHS_DONE].max()) if accuracy else 0
        if r.error is not None:
            status = "failed"
        else:
            status = "completed" if epochs_run >= c.epochs else "stopped early"
        rows.append({
            "trial_id": last.get("trial_id"), **c.to_row(), M.LATENCY_MS: r.config.get(M.LATENCY_MS),
            "reported_trainable_params": int(last.get(M.TRAINABLE_PARAMS, -1)),
            "within_budget": c.trainable_params <= budget,
            "val_accuracy_per_epoch": accuracy, "val_f1_macro_per_epoch": f1,
            "best_val_accuracy": max(accuracy) if accuracy else None,
            "epochs_run": epochs_run, "status": status,
            "wall_time_s": float(last.get("time_total_s", float("nan"))),
            "node": last.get(NODE_ID),
            "placement": last.get(M.PLACEMENT),
            "gpu_busy_pct": _mean(df[M.GPU_BUSY].dropna()) if df is not None and M.GPU_BUSY in df else None,
            "checkpoint_path": checkpoint_path(r),
        })
    return rows


def _mean(values: Any) -> float | None:
    return float(values.mean()) if len(values) else None


def gpu_busy(results: Any) -> dict[str, Any]:
    """How busy each GPU the trials held was, from the trials' own samples (`kdray.engine.GpuBusy`):
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


def write_results(result: "SearchResult") -> None:
    """`search/trials.parquet`, `search/summary.json` and `best_config.yaml`."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    run = result.run
    run.search.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(result.rows), run.trials)
    run.summary.write_text(json.dumps({"seconds": result.seconds, "rejected": result.rejected,
                                       "trials": len(result.rows), "test_reads": result.test_reads,
                                       "gpu": result.gpu}, indent=2))
    if result.best is not None:
        run.best_config.write_text(yaml.safe_dump(result.best, sort_keys=False))


def best_config(rows: list[dict], cfg: RunConfig) -> dict | None:
    """The trial with the best validation accuracy (any epoch); validation only, never test."""
    scored = [r for r in rows if r["best_val_accuracy"] is not None and r["status"] != "failed"]
    if not scored:
        return None
    b = max(scored, key=lambda r: (r["best_val_accuracy"], -r[M.TRAINABLE_PARAMS]))
    # `base`: the file is also a space, the run's config with the winner's knobs
    # (`kdray distill --space runs/<name>/best_config.yaml` retrains it alone).
    return {"base": "config.yaml", "trial_id": b["trial_id"], "best_val_accuracy": b["best_val_accuracy"],
            M.TRAINABLE_PARAMS: b[M.TRAINABLE_PARAMS], "budget": cfg.budget, **TrialConfig.from_row(b).to_yaml()}


def largest_student(cfg: RunConfig) -> StudentConfig:
    """The space's most memory-hungry student: its largest rank on its largest module set, every layer."""
    from kdray.config import LoraChoice

    sp = cfg.space
    lora = LoraChoice(r=max(sp.lora_r), alpha=max(sp.lora_alpha), dropout=sp.lora_dropout[0],
                      target_modules=max(sp.target_modules, key=len), layers=None)
    return dataclasses.replace(cfg.student, mode="lora", lora=lora, keep_layers=max(student_shapes(cfg), key=_depth))


def _depth(shape: list[int] | None) -> float:
    return float("inf") if shape is None else len(shape)


def rejected(study: optuna.Study) -> int:
    """Samples the study was told were infeasible (they never trained)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get(REJECTED_ATTR))


def count_rejected(storage_url: str, study_name: str) -> int:
    return rejected(optuna.load_study(study_name=study_name, storage=_optuna_storage(storage_url)))


# ----------------------------------------------------------------------------- the stage


def describe(cfg: RunConfig, num_labels: int, n_layers: int) -> None:
    """Print what the run derived: head cost, largest feasible rank per module set, trials, device."""
    s = cfg.student
    head = head_cost(s, num_labels)
    print(f"budget: {cfg.budget:,} trainable parameters; the head alone costs {head:,}")
    layers = "each layer in or out" if cfg.space.layers == "subset" else "all layers"
    print(f"student: {s.name or 'inline ' + s.config['model_type'] + ' config'}, {n_layers} layers{s.start_text()} "
          f"({layers}); largest rank within budget with all {n_layers} layers:")
    for ts in cfg.space.target_modules:
        lim = rank_limit(s, num_labels, ts, None)
        r = lim.max_rank(cfg.budget)
        ok = [x for x in cfg.space.lora_r if r is not None and x <= r]
        print(f"  {','.join(ts):<24} {lim.per_rank:>8,}/rank  max r {r if r is not None else 'none':>5}  "
              f"space ranks that fit: {ok or 'none (need fewer layers)'}")
    workers = cfg.resources.workers
    where = "in the trial's own process" if workers == 1 else f"on {workers} Ray Train (DDP) workers"
    # The device each trial gets is printed once Ray is up (`kdray.resources.Plan.line`).
    print(f"search: {cfg.search.trials} trials, {cfg.search.concurrency} at a time, epochs {cfg.space.epochs}, "
          f"ASHA grace {cfg.search.grace_period} / factor {cfg.search.reduction_factor}; each trial trains {where}")


def wandb_callback(mode: str, cfg: RunConfig, run: RunDir) -> Any:
    """One wandb run per trial, grouped by run name, logged from the driver
    (`kdray.tracking.trial_logger`); None when disabled."""
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    from kdray.tracking import trial_logger

    run.wandb.mkdir(parents=True, exist_ok=True)
    return trial_logger(cfg.name, run.root, exclude=("feasible", NODE_ID))


@dataclasses.dataclass
class SearchResult:
    rows: list[dict]
    best: dict | None
    rejected: int
    run: RunDir
    seconds: float
    test_reads: list[str] = dataclasses.field(default_factory=list)
    """Who had opened the test split when selection ended (`TaskData.test_reads`): empty."""
    gpu: dict = dataclasses.field(default_factory=dict)
    """GPU utilisation the trials sampled on their own GPUs (`kdray.engine.GpuBusy`), per GPU."""


def run_search(cfg: RunConfig, task: Any, run: RunDir, n_layers: int, inputs: tuple[Any, Any], plan: Any, *,
               resume: bool = False, wandb: Any = None, shapes: ShapeTable | None = None) -> SearchResult:
    """The Tune search over `task` (the data stage's `TaskData`) with the distillation `inputs`
    `(job, data)`, each trial holding what `plan` (the students' `kdray.resources.Plan`) gives
    it; writes trials.parquet and best_config.yaml. Ray must be running (`kdray.cluster.start`);
    `wandb` is `wandb_callback`'s, made before Ray started (or None); `shapes` the measured
    student shapes (`kdray.shapes.measure`), when shapes are searched or latency is budgeted."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from kdray.cluster import storage_join, storage_root
    from kdray.engine import distill_spec, progress_callback, tune_run_config, tune_trainable

    from kdray.console import quiet_optuna

    quiet_optuna()
    t0 = time.perf_counter()
    storage = storage_root(cfg, run.root)
    job, data = inputs
    spec = distill_spec(cfg, job, data, storage_join(storage, "train"), plan.resources)
    run.search.mkdir(parents=True, exist_ok=True)
    callbacks = [progress_callback(total=cfg.search.trials, concurrency=cfg.search.concurrency)] + ([wandb] if wandb is not None else [])
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
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=make_searcher(cfg, space, run.optuna_url),
                                        scheduler=scheduler, num_samples=cfg.search.trials,
                                        max_concurrent_trials=cfg.search.concurrency,
                                        reuse_actors=cfg.search.reuse_actors),
            run_config=run_config,
        )
    grid = tuner.fit()
    rows = trial_rows(grid, cfg.budget)
    best = best_config(rows, cfg)
    result = SearchResult(rows, best, count_rejected(run.optuna_url, cfg.name), run, time.perf_counter() - t0,
                          list(task.test_reads), gpu_busy(grid))
    write_results(result)
    return result


def summarize(result: SearchResult, cfg: RunConfig) -> None:
    counts = status_counts(result.rows)
    print(f"search done in {result.seconds:.0f}s: {counts['completed']} completed, {counts['stopped early']} stopped early, "
          f"{counts['failed']} failed, {result.rejected} infeasible configs (over budget, too slow, or no layer) rejected before training")
    b = result.best
    if b is None:
        print("no trial reported a validation accuracy")
        return
    c = TrialConfig.from_yaml(b)
    print(f"best: val accuracy {b['best_val_accuracy']:.4f} with {b[M.TRAINABLE_PARAMS]:,} trainable parameters "
          f"({100 * b[M.TRAINABLE_PARAMS] / cfg.budget:.1f}% of budget): alpha {c.alpha:.3f}, "
          f"T {c.temperature:.2f}, lr {c.learning_rate:.2e}, r {c.lora.r}, lora_alpha {c.lora.alpha:g}, "
          f"targets {','.join(c.lora.target_modules)}, layers {c.layers_text}")
    print(f"wrote {result.run.trials} and {result.run.best_config}")
