"""Search stage: the budget-constrained Ray Tune + Optuna + ASHA search. kdray's main command.

    python -m kdray.search --budget 1e6 [--space FILE] [--set key=value ...] [--trials N]

Each Optuna sample is counted on the meta device while it is drawn; one over budget is told to
the sampler (an Optuna constraint plus the worst value) and replaced by a new sample before it
ever becomes a Tune trial, so no device time goes to it. Trials are function trainables that
launch a Ray Train `TorchTrainer` running `kdray.distill`; ASHA stops weak ones early on
`val/accuracy` per epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from ray.tune.search.optuna import OptunaSearch

from kdray import metrics as M
from kdray.budget import count, head_cost, rank_limit, require_feasible
from kdray.cluster import NODE_ID, add_cluster_arguments
from kdray.config import LoraChoice, RunConfig, SpaceConfig, StudentConfig, add_space_arguments, load_config, to_dict
from kdray.errors import UserError, run_cli
from kdray.report import wandb_mode_of

METRIC, MODE = M.VAL_ACCURACY, "max"
REJECTED_ATTR = "kdray_rejected"


# ----------------------------------------------------------------------------- the space


class BudgetedSpace:
    """Optuna define-by-run space that counts each sample's trainable parameters.

    Module-level and picklable (Tune saves the searcher for resume). It does no computation
    besides the count (a meta-device build, milliseconds). An over-budget sample gets a positive
    Optuna constraint value and `feasible: False`; `BudgetedOptunaSearch` then rejects it.
    """

    def __init__(self, space: SpaceConfig, student: StudentConfig, num_labels: int, budget: int, n_layers: int):
        self.space, self.student, self.num_labels = space, student, num_labels
        self.budget, self.n_layers = budget, n_layers

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
                trial.suggest_categorical(f"layer_{i}", [True, False])
        params = dict(trial.params)
        choice = lora_choice(params, self.n_layers)
        if not choice.layers and choice.layers is not None:
            n, feasible = 0, False  # no layer chosen: not a LoRA student at all
        else:
            n = count(dataclasses.replace(self.student, mode="lora", lora=choice), self.num_labels)
            feasible = n <= self.budget
        # Feasible when <= 0: trainable parameters over budget (an empty layer set counts as over).
        trial.set_constraint("budget", float(n - self.budget) if n else 1.0)
        if not feasible:
            trial.set_user_attr(REJECTED_ATTR, True)
        return {M.TRAINABLE_PARAMS: n, "feasible": feasible}


def lora_choice(params: dict[str, Any], n_layers: int) -> LoraChoice:
    """The LoRA choice of a sampled configuration (layer_i flags -> a subset of layers)."""
    flags = [params[f"layer_{i}"] for i in range(n_layers) if f"layer_{i}" in params]
    layers = [i for i, on in enumerate(flags) if on] if flags else None
    return LoraChoice(r=int(params["lora_r"]), alpha=float(params["lora_alpha"]), dropout=float(params["lora_dropout"]),
                      target_modules=str(params["target_modules"]).split(","), layers=layers)


class BudgetedOptunaSearch(OptunaSearch):
    """OptunaSearch that never hands Tune an over-budget configuration.

    An infeasible sample is told to the study at once (worst value; its constraint is already
    set, so TPE learns the region is infeasible) and replaced by a new one.
    """

    max_rejections = 200

    def suggest(self, trial_id: str) -> dict | None:
        for _ in range(self.max_rejections):
            config = super().suggest(trial_id)
            if config is None or config.get("feasible", True):
                return config
            self._ot_study.tell(self._ot_trials.pop(trial_id), 0.0)
        raise RuntimeError(f"{self.max_rejections} samples in a row were over the budget: narrow the "
                           f"space (smaller ranks, fewer modules or layers).")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            # After --resume the study (SQLite) can be ahead of Tune's last snapshot: a trial it
            # already closed reports again. The study keeps its first verdict.
            pass


def make_searcher(cfg: RunConfig, space: BudgetedSpace, storage_url: str | None) -> Any:
    from optuna.samplers import TPESampler

    # Multivariate TPE handles the conditional, grouped space; constant_liar spreads parallel trials.
    sampler = TPESampler(seed=cfg.seed, multivariate=True, group=True, constant_liar=True,
                         n_startup_trials=max(4, cfg.search.concurrency))
    kwargs = {"storage": _optuna_storage(storage_url)} if storage_url else {}
    searcher = BudgetedOptunaSearch(space=space, metric=METRIC, mode=MODE, sampler=sampler, study_name=cfg.name,
                                    **kwargs)
    searcher.max_rejections = cfg.search.max_rejections
    return searcher


def _optuna_storage(url: str) -> Any:
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})


# ----------------------------------------------------------------------------- the trial


def trial_job(template: Any, config: dict[str, Any], n_layers: int) -> Any:
    """The `DistillJob` of one configuration: a sampled one, or a final-stage run, which also
    sets `seed` and may set `mode: head` (the frozen-encoder baseline)."""
    train = dataclasses.replace(template.train, alpha=float(config["alpha"]), temperature=float(config["temperature"]),
                                learning_rate=float(config["learning_rate"]), epochs=int(config["epochs"]))
    return dataclasses.replace(template, model=case_student(template.model, config, n_layers), train=train,
                               seed=int(config.get("seed", template.seed)))


def case_student(student: Any, config: dict[str, Any], n_layers: int) -> Any:
    """`student` as a configuration trains it: LoRA as sampled, or `mode: head` (the final
    stage's frozen-encoder baseline), which keeps the student's own LoRA fields unused."""
    mode = config.get("mode", "lora")
    lora = lora_choice(config, n_layers) if mode == "lora" else student.lora
    return dataclasses.replace(student, mode=mode, lora=lora)


def run_trial(config: dict[str, Any], refs: dict[str, Any]) -> None:
    """Tune function trainable: one distillation on Ray Train, metrics forwarded to Tune per epoch.

    `config` is a sampled configuration, or `{"case": ...}` for a run of the final stage."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from kdray.cluster import distill_worker, fit

    job = trial_job(refs["job"], case_of(config), refs["n_layers"])
    ctx = ray.tune.get_context()
    fit(distill_worker, {"job": job, "data": refs["data"]}, name=f"trial-{ctx.get_trial_id()}",
        storage_path=refs["storage"], resources=refs["resources"], max_failures=refs["max_failures"],
        callbacks=[TuneReportCallback()], resume=True)


# ----------------------------------------------------------------------------- progress


def progress_callback(n_layers: int, label: Any = None) -> Any:
    """`label(trial)` names a trial in the first column (default: its id)."""
    from ray.tune import Callback

    label = label or (lambda trial: trial.trial_id)

    class Progress(Callback):
        """One concise line per trial epoch and per finished trial."""

        def __init__(self) -> None:
            self.header = False

        def _line(self, trial: Any, result: dict, status: str) -> None:
            if not self.header:
                print(f"{'trial':<16} {'alpha':>5} {'T':>5} {'r':>3} {'layers':<12} {'params':>9} {'epoch':>5} "
                      f"{'val acc':>7}  status", flush=True)
                self.header = True
            c = case_of(trial.config)
            lora = lora_choice(c, n_layers) if c.get("mode", "lora") == "lora" else None  # None: head only
            shown = "all" if lora is None or lora.layers is None else ",".join(map(str, lora.layers))
            r = "-" if lora is None else lora.r
            acc = result.get(METRIC)
            print(f"{label(trial):<16} {c['alpha']:>5.2f} {c['temperature']:>5.2f} {r:>3} {shown:<12} "
                  f"{c[M.TRAINABLE_PARAMS]:>9,} {result.get(M.EPOCHS_DONE, 0):>5} "
                  f"{acc if acc is None else f'{acc:.4f}':>7}  {status}", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._line(trial, result, "running")

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            done = result.get(M.EPOCHS_DONE, 0) >= case_of(trial.config)["epochs"]
            self._line(trial, result, "completed" if done else "stopped early")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, trial.last_result or {}, "failed")

    return Progress()


def case_of(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's configuration: the sampled one, or the final stage's `{"case": ...}`."""
    return config.get("case", config)


# ----------------------------------------------------------------------------- results


def trial_rows(results: Any, budget: int, n_layers: int) -> list[dict[str, Any]]:
    """One row per trial: config, params, per-epoch val metrics, epochs run, status, wall time, node."""
    rows = []
    for r in results:
        c, last = dict(r.config), r.metrics or {}
        df = r.metrics_dataframe
        per_epoch = df.dropna(subset=[METRIC]) if df is not None and METRIC in df else None
        accuracy = [float(x) for x in per_epoch[METRIC]] if per_epoch is not None else []
        f1 = [float(x) for x in per_epoch[M.VAL_F1]] if per_epoch is not None else []
        epochs_run = int(per_epoch[M.EPOCHS_DONE].max()) if accuracy else 0
        if r.error is not None:
            status = "failed"
        else:
            status = "completed" if epochs_run >= int(c["epochs"]) else "stopped early"
        layers = lora_choice(c, n_layers).layers
        rows.append({
            "trial_id": last.get("trial_id"),
            **{k: float(c[k]) for k in ("alpha", "temperature", "learning_rate", "lora_alpha", "lora_dropout")},
            "lora_r": int(c["lora_r"]), "target_modules": c["target_modules"],
            "layers": "all" if layers is None else ",".join(map(str, layers)), "epochs": int(c["epochs"]),
            M.TRAINABLE_PARAMS: int(c[M.TRAINABLE_PARAMS]),
            "reported_trainable_params": int(last.get(M.TRAINABLE_PARAMS, -1)),
            "within_budget": int(c[M.TRAINABLE_PARAMS]) <= budget,
            "val_accuracy_per_epoch": accuracy, "val_f1_macro_per_epoch": f1,
            "best_val_accuracy": max(accuracy) if accuracy else None,
            "epochs_run": epochs_run, "status": status,
            "wall_time_s": float(last.get("time_total_s", float("nan"))),
            "node": last.get(NODE_ID),
            "checkpoint_path": last.get("checkpoint_path"),
        })
    return rows


def write_results(result: "SearchResult") -> None:
    """`search/trials.parquet`, `search/summary.json` and `best_config.yaml`."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    search = result.run_dir / "search"
    search.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(result.rows), search / "trials.parquet")
    (search / "summary.json").write_text(json.dumps({"seconds": result.seconds, "rejected": result.rejected,
                                                     "trials": len(result.rows), "test_reads": result.test_reads},
                                                    indent=2))
    if result.best is not None:
        (result.run_dir / "best_config.yaml").write_text(yaml.safe_dump(result.best, sort_keys=False))


def status_counts(rows: list[dict]) -> dict[str, int]:
    """Trials per status: completed, stopped early, failed."""
    return {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped early", "failed")}


def best_config(rows: list[dict], cfg: RunConfig) -> dict | None:
    """The trial with the best validation accuracy (any epoch); validation only, never test."""
    scored = [r for r in rows if r["best_val_accuracy"] is not None and r["status"] != "failed"]
    if not scored:
        return None
    b = max(scored, key=lambda r: (r["best_val_accuracy"], -r[M.TRAINABLE_PARAMS]))
    layers = None if b["layers"] == "all" else [int(x) for x in b["layers"].split(",")]
    return {
        "trial_id": b["trial_id"], "best_val_accuracy": b["best_val_accuracy"], M.TRAINABLE_PARAMS: b[M.TRAINABLE_PARAMS],
        "budget": cfg.budget,
        "train": {"alpha": b["alpha"], "temperature": b["temperature"], "learning_rate": b["learning_rate"],
                  "epochs": b["epochs"]},
        "student": {"mode": "lora", "lora": {"r": b["lora_r"], "alpha": b["lora_alpha"], "dropout": b["lora_dropout"],
                                             "target_modules": b["target_modules"].split(","), "layers": layers}},
    }


def count_rejected(storage_url: str, study_name: str) -> int:
    study = optuna.load_study(study_name=study_name, storage=_optuna_storage(storage_url))
    return sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get(REJECTED_ATTR))


# ----------------------------------------------------------------------------- the command


def describe(cfg: RunConfig, num_labels: int, n_layers: int) -> None:
    """Print what the run derived: head cost, largest feasible rank per module set, trials, device."""
    s = cfg.student
    head = head_cost(s, num_labels)
    print(f"budget: {cfg.budget:,} trainable parameters; the head alone costs {head:,}")
    layers = "each layer in or out" if cfg.space.layers == "subset" else "all layers"
    print(f"student: {s.name or 'inline ' + s.config['model_type'] + ' config'}, {n_layers} layers ({layers}); "
          f"largest rank within budget with all {n_layers} layers:")
    for ts in cfg.space.target_modules:
        lim = rank_limit(s, num_labels, ts, None)
        r = lim.max_rank(cfg.budget)
        ok = [x for x in cfg.space.lora_r if r is not None and x <= r]
        print(f"  {','.join(ts):<24} {lim.per_rank:>8,}/rank  max r {r if r is not None else 'none':>5}  "
              f"space ranks that fit: {ok or 'none (need fewer layers)'}")
    res = cfg.resources
    device = f"{res.gpus_per_worker:g} GPU" if res.gpus_per_worker else f"{res.cpus_per_worker:g} CPU"
    print(f"search: {cfg.search.trials} trials, {cfg.search.concurrency} at a time, epochs {cfg.space.epochs}, "
          f"ASHA grace {cfg.search.grace_period} / factor {cfg.search.reduction_factor}; "
          f"{res.workers} Train worker(s) per trial, {device} each")


def wandb_callback(mode: str, cfg: RunConfig, run_dir: Path) -> Any:
    """One wandb run per trial, grouped by run name. Call before Ray starts: the logging actor
    takes WANDB_MODE from the environment Ray forwards (`kdray.cluster.init_ray`)."""
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    from ray.air.integrations.wandb import WandbLoggerCallback

    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    # upload_timeout: the default 1800 s would hold Ctrl-C for half an hour (RAY_NOTES.md).
    return WandbLoggerCallback(project="kdray", group=cfg.name, upload_timeout=60, dir=str(run_dir),
                               excludes=["feasible", NODE_ID])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m kdray.search", description=(
        "Search for the best distilled LoRA student within a trainable-parameter budget: Ray Tune + "
        "Optuna (TPE) + ASHA, each trial a Ray Train distillation. Over-budget configurations never train."))
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
    ap = build_parser()
    args = ap.parse_args(argv)
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
    wandb_mode = wandb_mode_of(args.wandb)
    run_dir = Path(args.output_dir).resolve() / cfg.name
    search_dir = run_dir / "search"
    if args.resume and not (search_dir / "optuna.db").is_file():
        raise UserError(f"--resume: no search to resume in {search_dir}. Fix: drop --resume, or pass the "
                        f"--name/--output-dir/--storage-path of the killed run.")
    if not args.resume and search_dir.exists():
        raise UserError(f"{search_dir} already holds a search. Fix: --resume to continue it, or --name NEW.")
    if args.export is not None and args.no_final:
        raise UserError("--export copies the report, which --no-final does not make. Fix: drop one of them.")

    from kdray.data import load_data
    from kdray.models import build_model, encoder_layers

    task = load_data(cfg.data)  # bad data exits 2 here, before Ray starts
    num_labels = task.num_labels
    require_feasible(cfg, num_labels)
    n_layers = len(encoder_layers(build_model(cfg.student, num_labels, device="meta"))[1])
    describe(cfg, num_labels, n_layers)
    result = run_search(cfg, task, run_dir, n_layers, resume=args.resume, address=args.address,
                        wandb_mode=wandb_mode)
    summarize(result, cfg)
    if args.no_final:
        print(f"final stage skipped (--no-final); run it with: python -m kdray.final --run {run_dir}")
        return 0
    if result.best is None:
        raise RuntimeError("no trial reported a validation accuracy: nothing for the final stage to retrain")
    from kdray.final import run_final
    from kdray.report import export, write_report

    run_final(cfg, task, run_dir, n_layers)
    write_report(run_dir, wandb_mode=wandb_mode)
    if args.export is not None:
        export(run_dir, Path(args.export))
    return 0


@dataclasses.dataclass
class SearchResult:
    rows: list[dict]
    best: dict | None
    rejected: int
    run_dir: Path
    seconds: float
    test_reads: list[str] = dataclasses.field(default_factory=list)
    """Who had opened the test split when selection ended (`TaskData.test_reads`): empty."""


def run_search(cfg: RunConfig, task: Any, run_dir: Path, n_layers: int, *, resume: bool = False,
               address: str | None = None, wandb_mode: str = "offline") -> SearchResult:
    """Teacher (cached), then the Tune search over `task` (the data stage's `TaskData`);
    writes trials.parquet and best_config.yaml."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from kdray.cluster import init_ray, storage_join, storage_root, warn_if_storage_is_local
    from kdray.distill import distill_inputs
    from kdray.teacher import prepare_teacher

    t0 = time.perf_counter()
    print(f"data: {task.description}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    wb = wandb_callback(wandb_mode, cfg, run_dir)
    init_ray(address)
    warn_if_storage_is_local(cfg)
    storage = storage_root(cfg, run_dir)
    teacher = prepare_teacher(cfg, task, storage_path=storage_join(storage, "train"))
    job, data = distill_inputs(cfg, task, teacher)
    refs = {"job": job, "data": ray.put(data), "n_layers": n_layers, "storage": storage_join(storage, "train"),
            "resources": fit_resources(cfg), "max_failures": cfg.search.max_failures}
    # The trial's own process holds almost nothing: its Train workers need the CPUs (RAY_NOTES.md).
    trainable = tune.with_resources(tune.with_parameters(run_trial, refs=refs), {"cpu": TRIAL_DRIVER_CPU})
    storage_url = f"sqlite:///{run_dir / 'search' / 'optuna.db'}"
    (run_dir / "search").mkdir(parents=True, exist_ok=True)
    callbacks = [progress_callback(n_layers)]
    if wb is not None:
        callbacks.append(wb)
    # Snapshot the experiment at every step, not every ~10 s: a search killed right after a
    # trial finished must not run that trial again on --resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    if resume:
        tuner = tune.Tuner.restore(storage_join(storage, "search"), trainable=trainable, resume_errored=True)
    else:
        space = BudgetedSpace(cfg.space, cfg.student, task.num_labels, cfg.budget, n_layers)
        scheduler = ASHAScheduler(time_attr=M.EPOCHS_DONE, max_t=max(cfg.space.epochs),
                                  grace_period=cfg.search.grace_period, reduction_factor=cfg.search.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=make_searcher(cfg, space, storage_url),
                                        scheduler=scheduler, num_samples=cfg.search.trials,
                                        max_concurrent_trials=cfg.search.concurrency),
            run_config=tune.RunConfig(name="search", storage_path=storage, callbacks=callbacks, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures)),
        )
    grid = tuner.fit()
    rows = trial_rows(grid, cfg.budget, n_layers)
    best = best_config(rows, cfg)
    result = SearchResult(rows, best, count_rejected(storage_url, cfg.name), run_dir, time.perf_counter() - t0,
                          list(task.test_reads))
    write_results(result)
    return result


TRIAL_DRIVER_CPU = 0.01


def fit_resources(cfg: RunConfig) -> Any:
    """Per-worker CPUs such that `concurrency` trials, drivers included, fit the cluster at once.

    Each trial's driver takes 0.01 CPU on top of its workers, so on 2 CPUs two trials of one
    1-CPU worker need 2.02 and the second waits forever for its worker group. Shave the
    workers' share (0.98 CPU still runs one thread) rather than oversubscribe the machine. The
    share leaves room on one node for every trial's driver: Ray tends to place the small driver
    actors together (on two 1-CPU nodes, both drivers on one node would leave 0.98 CPU there).
    """
    import ray

    res = cfg.resources
    total = ray.cluster_resources().get("CPU", 0.0)
    n = cfg.search.concurrency
    need = n * (res.workers * res.cpus_per_worker + TRIAL_DRIVER_CPU)
    if res.gpus_per_worker > 0 or total <= 0 or need <= total:
        return res
    largest = max(node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive"))
    share = int((min(total / n, largest) - n * TRIAL_DRIVER_CPU) / res.workers * 100) / 100
    if share < 0.5:
        return res  # far too small a cluster for this concurrency: trials will queue
    print(f"resources: {n} trials x ({res.workers} x {res.cpus_per_worker:g} CPU + "
          f"{TRIAL_DRIVER_CPU} for the trial) exceed the cluster's {total:g} CPUs; using {share:g} CPU per worker")
    return dataclasses.replace(res, cpus_per_worker=share)


def summarize(result: SearchResult, cfg: RunConfig) -> None:
    counts = status_counts(result.rows)
    print(f"search done in {result.seconds:.0f}s: {counts['completed']} completed, {counts['stopped early']} stopped early, "
          f"{counts['failed']} failed, {result.rejected} infeasible configs (over budget, or no layer) rejected before training")
    b = result.best
    if b is None:
        print("no trial reported a validation accuracy")
        return
    lora = b["student"]["lora"]
    print(f"best: val accuracy {b['best_val_accuracy']:.4f} with {b[M.TRAINABLE_PARAMS]:,} trainable parameters "
          f"({100 * b[M.TRAINABLE_PARAMS] / cfg.budget:.1f}% of budget): alpha {b['train']['alpha']:.3f}, "
          f"T {b['train']['temperature']:.2f}, lr {b['train']['learning_rate']:.2e}, r {lora['r']}, "
          f"lora_alpha {lora['alpha']:g}, targets {','.join(lora['target_modules'])}, "
          f"layers {lora['layers'] if lora['layers'] is not None else 'all'}")
    print(f"wrote {result.run_dir / 'search' / 'trials.parquet'} and {result.run_dir / 'best_config.yaml'}")


if __name__ == "__main__":
    run_cli(main)
