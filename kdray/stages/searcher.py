"""The budget-aware sampler: an Optuna define-by-run space that counts every sample on the meta
device, and the OptunaSearch and TPE sampler that never train an infeasible one."""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from kdray import metrics as M
from kdray.config import RunConfig, SpaceConfig, StudentConfig
from kdray.train.budget import count
from kdray.trials import LAYER_PREFIX, REJECTED_ATTR, REJECTED_WHY_ATTR, SHAPE_PARAM, TrialConfig, shape_text


#: What the search maximises: validation accuracy (the test split is never read).
METRIC, MODE = M.VAL_ACCURACY, "max"


class BudgetedSpace:
    """Optuna define-by-run space that counts each sample's trainable parameters.

    Module-level and picklable (Tune saves the searcher for resume). It does no computation
    besides the count (a meta-device build, milliseconds). An over-budget sample gets a positive
    Optuna constraint value and `feasible: False`; `BudgetedOptunaSearch` then rejects it.
    `n_layers` is the student's encoder depth: one `layer_i` flag each when layers are searched.
    With `space.keep_layers` the shape is a parameter too; `latency` (shape text -> batch-1 ms,
    `kdray.stages.shapes.ShapeTable.latency_of`) and `limit_ms` make a too-slow shape infeasible the
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
        # One choice is not sampled (Optuna returns it without the sampler), so a space that does
        # not search the variant draws exactly what it drew before the knob existed.
        trial.suggest_categorical("lora_variant", sp.lora_variant)
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


def rejected(study: optuna.Study) -> int:
    """Samples the study was told were infeasible (they never trained)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get(REJECTED_ATTR))


def count_rejected(storage_url: str, study_name: str) -> int:
    return rejected(optuna.load_study(study_name=study_name, storage=_optuna_storage(storage_url)))
