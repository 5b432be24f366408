"""The run directory, `runs/<name>/`, and every file in it: each path defined once, each file
read and written here and nowhere else, as the typed value it holds.

A stage hands the next one a typed artefact (`SearchResult`, `FinalRecord`, the teacher's
`TeacherResult`); on disk it is one file of the run (`save(run)`), read back by `load(run)`.
A file that cannot be read back (cut short, edited, from another version) is a `DamagedFile`:
one message naming the file and the command that writes it again, exit status 2. A reviewer can
read a run without kdray (DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdray import metrics as M
from kdray.errors import UserError
from kdray.trials import TrialConfig


@dataclass(frozen=True)
class RunDir:
    """`runs/<name>/` of one run (an absolute path)."""

    root: Path

    @classmethod
    def of(cls, output_dir: str | Path, name: str) -> "RunDir":
        return cls(Path(output_dir).resolve() / name)

    # the run
    @property
    def config(self) -> Path:
        """The resolved config (`kdray.config.to_dict`): a space file, read by `kdray.config.load_config`."""
        return self.root / "config.yaml"

    def save_config(self, config: dict[str, Any]) -> None:
        import yaml

        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def best_config(self) -> Path:
        """The search's choice (validation only): `trial_id`, `best_val_accuracy`, `train:`, `student:`."""
        return self.root / "best_config.yaml"

    # the search
    @property
    def search(self) -> Path:
        """The Tune experiment, the Optuna study, the trial table."""
        return self.root / "search"

    @property
    def optuna_db(self) -> Path:
        return self.search / "optuna.db"

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.optuna_db}"

    @property
    def trials(self) -> Path:
        """One row per trial (`TrialRow`)."""
        return self.search / "trials.parquet"

    @property
    def summary(self) -> Path:
        """Search wall time, rejected samples, trials, test-split reads."""
        return self.search / "summary.json"

    # the final stage
    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def final_json(self) -> Path:
        return self.final / "final.json"

    @property
    def predictions(self) -> Path:
        return self.final / "predictions.parquet"

    @property
    def student(self) -> Path:
        """The merged student, loadable by `transformers.pipeline`."""
        return self.final / "student"

    @property
    def adapter(self) -> Path:
        """The unmerged PEFT adapter."""
        return self.final / "adapter"

    def served(self, runtime: str) -> Path:
        """The student's form for `runtime` (`serve.runtime`): `final/student` for pytorch, else
        `final/student-<runtime>` (`kdray.serve`)."""
        return self.student if runtime == "pytorch" else self.final / f"student-{runtime}"

    # the report
    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def results(self) -> Path:
        """Everything the report shows (`kdray.report.results`), as JSON."""
        return self.root / "results.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"


class DamagedFile(UserError):
    """A run file that cannot be read back: cut short, edited, or written by another version."""


def _read(path: Path, parse: Callable[[Path], Any], fix: str) -> Any:
    """`parse(path)`, or a `DamagedFile` naming `path` and `fix` (the command that writes it)."""
    try:
        return parse(path)
    except FileNotFoundError:
        raise DamagedFile(f"{path}: missing. Fix: {fix}.") from None
    except Exception as e:  # pyarrow, json, yaml and our own shape checks raise many types
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedFile(f"{path}: damaged, it cannot be read back ({type(e).__name__}: {why}). Fix: {fix}.") from None


def _search_again(run: RunDir) -> str:
    return (f"run the search again: `kdray search --name {run.root.name} --output-dir {run.root.parent} --resume` "
            f"(or --overwrite)")


def _final_again(run: RunDir) -> str:
    return f"run the final stage again: `kdray final --run {run.root}`"


# ----------------------------------------------------------------------------- the search


#: Trial statuses in `search/trials.parquet`: `interrupted` is a trial a Ctrl-C stopped (the
#: search can be resumed), `stopped early` one ASHA stopped.
STATUSES = ("completed", "stopped early", "interrupted", "failed")


@dataclass(frozen=True)
class TrialRow:
    """One trial of a search, as `search/trials.parquet` holds it (one row)."""

    trial_id: str
    config: TrialConfig
    """What the trial trained, its trainable parameters counted on the meta device."""
    status: str
    """One of `STATUSES`."""
    val_accuracy_per_epoch: list[float] = field(default_factory=list)
    val_f1_macro_per_epoch: list[float] = field(default_factory=list)
    train_loss_per_epoch: list[float] = field(default_factory=list)
    """The training loss of each epoch: what shows two runs trained alike, which a tiny model's
    chance-level validation accuracy cannot."""
    epochs_run: int = 0
    reported_trainable_params: int = -1
    """What the trial's own model counted (it must equal `config.trainable_params`)."""
    within_budget: bool = True
    latency_ms: float | None = None
    """The shape's batch-1 latency, when shapes were timed (`kdray.stages.shapes`)."""
    latency_runtime: str | None = None
    """The form `latency_ms` was measured in (`serve.runtime`), when shapes were timed."""
    wall_time_s: float = math.nan
    node: str | None = None
    placement: list[dict] | None = None
    """Where it trained: each rank's node, GPU ids and device (`kdray.runtime.devices.Placement`)."""
    gpu_busy_pct: float | None = None
    checkpoint_path: str | None = None

    @property
    def best_val_accuracy(self) -> float | None:
        return max(self.val_accuracy_per_epoch) if self.val_accuracy_per_epoch else None

    def to_record(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, **self.config.to_row(), M.LATENCY_MS: self.latency_ms,
                "latency_runtime": self.latency_runtime,
                "reported_trainable_params": self.reported_trainable_params, "within_budget": self.within_budget,
                "val_accuracy_per_epoch": self.val_accuracy_per_epoch,
                "val_f1_macro_per_epoch": self.val_f1_macro_per_epoch,
                "train_loss_per_epoch": self.train_loss_per_epoch, "best_val_accuracy": self.best_val_accuracy,
                "epochs_run": self.epochs_run, "status": self.status, "wall_time_s": self.wall_time_s,
                "node": self.node, "placement": None if self.placement is None else json.dumps(self.placement),
                "gpu_busy_pct": self.gpu_busy_pct, "checkpoint_path": self.checkpoint_path}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> "TrialRow":
        if r["status"] not in STATUSES:
            raise ValueError(f"trial {r['trial_id']}: unknown status {r['status']!r}")
        return cls(trial_id=r["trial_id"], config=TrialConfig.from_row(r), status=r["status"],
                   val_accuracy_per_epoch=list(r["val_accuracy_per_epoch"] or []),
                   val_f1_macro_per_epoch=list(r["val_f1_macro_per_epoch"] or []),
                   train_loss_per_epoch=list(r.get("train_loss_per_epoch") or []), epochs_run=int(r["epochs_run"]),
                   reported_trainable_params=int(r["reported_trainable_params"]),
                   within_budget=bool(r["within_budget"]), latency_ms=r.get(M.LATENCY_MS),
                   latency_runtime=r.get("latency_runtime"),
                   wall_time_s=float(r["wall_time_s"]), node=r.get("node"),
                   placement=json.loads(r["placement"]) if r.get("placement") else None,
                   gpu_busy_pct=r.get("gpu_busy_pct"), checkpoint_path=r.get("checkpoint_path"))


def status_counts(rows: list[TrialRow]) -> dict[str, int]:
    """Trials per status (`STATUSES`)."""
    return {s: sum(r.status == s for r in rows) for s in STATUSES}


@dataclass(frozen=True)
class SearchChoice:
    """The search's choice (validation only), as `best_config.yaml` holds it. The file is also a
    space: its run's `config.yaml` as `base`, the winner's knobs over it (`kdray distill --space
    runs/<name>/best_config.yaml` retrains it alone)."""

    trial_id: str
    best_val_accuracy: float
    config: TrialConfig
    budget: int | None

    @property
    def trainable_params(self) -> int:
        return self.config.trainable_params

    def to_yaml(self) -> dict[str, Any]:
        return {"base": "config.yaml", "trial_id": self.trial_id, "best_val_accuracy": self.best_val_accuracy,
                M.TRAINABLE_PARAMS: self.trainable_params, "budget": self.budget, **self.config.to_yaml()}

    @classmethod
    def from_yaml(cls, d: dict[str, Any]) -> "SearchChoice":
        return cls(str(d["trial_id"]), float(d["best_val_accuracy"]), TrialConfig.from_yaml(d), d.get("budget"))


@dataclass(frozen=True)
class SearchSummary:
    """`search/summary.json`: what the search as a whole did."""

    seconds: float
    rejected: int
    """Samples rejected before training (over budget, too slow, no layer)."""
    trials: int
    test_reads: list[str]
    """Who had opened the test split when selection ended: empty (`kdray.data.load.TaskData`)."""
    gpu: dict[str, Any] = field(default_factory=dict)
    """How busy the trials' GPUs were, from the trials' own samples."""
    interrupted: bool = False
    """A Ctrl-C (SIGINT or SIGTERM) ended it before every trial did; `--resume` continues it."""


@dataclass(frozen=True)
class SearchResult:
    """The search stage's artefact: every trial, the choice, and the summary."""

    rows: list[TrialRow]
    best: SearchChoice | None
    summary: SearchSummary

    def save(self, run: RunDir) -> None:
        """`search/trials.parquet`, `search/summary.json` and `best_config.yaml`."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        import yaml

        run.search.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([r.to_record() for r in self.rows]), run.trials)
        run.summary.write_text(json.dumps(dataclasses.asdict(self.summary), indent=2))
        if self.best is not None:
            run.best_config.write_text(yaml.safe_dump(self.best.to_yaml(), sort_keys=False))

    @classmethod
    def load(cls, run: RunDir) -> "SearchResult":
        return cls(load_trials(run), load_choice(run) if run.best_config.is_file() else None, load_summary(run))


def load_trials(run: RunDir) -> list[TrialRow]:
    import pyarrow.parquet as pq

    return _read(run.trials, lambda p: [TrialRow.from_record(r) for r in pq.read_table(p).to_pylist()],
                 _search_again(run))


def load_choice(run: RunDir) -> SearchChoice:
    import yaml

    return _read(run.best_config, lambda p: SearchChoice.from_yaml(yaml.safe_load(p.read_text())), _search_again(run))


def load_summary(run: RunDir) -> SearchSummary:
    return _read(run.summary, lambda p: SearchSummary(**json.loads(p.read_text())), _search_again(run))


# ----------------------------------------------------------------------------- the final stage


@dataclass
class FinalRecord:
    """The final stage's artefact, `final/final.json`: every measurement of the retrained models."""

    seeds: int
    device: str
    """Where the test scores and the benchmark were measured, in words (`kdray.machine.device_name`)."""
    device_type: str
    placement: dict[str, Any]
    """The measuring task's node, GPU ids and device (`kdray.runtime.tasks`)."""
    reused_search_trial: str | None
    train_seconds: float
    seconds: float
    data: dict[str, Any]
    """The task's description, label names, split sizes, test-split reads, truncation."""
    teacher: dict[str, Any]
    """The teacher's validation and test scores, and what it was fine-tuned on."""
    variants: dict[str, dict[str, Any]]
    """Per variant (`kdray.trials.VARIANTS`): each seed's run and the mean and spread of its scores."""
    benchmark: dict[str, dict[str, Any]]
    """Per model: latency, throughput, size, peak memory (`kdray.evaluate.benchmark`)."""
    merge_max_abs_logit_diff: float
    error_analysis: dict[str, Any]
    student_dir: str
    adapter_dir: str
    serving: dict[str, Any] = field(default_factory=dict)
    """The served forms (`kdray.stages.serving.measure_forms`): each form of the student and the
    teacher benchmarked where it runs and scored on test, the recommended form and why; empty when
    the forms were not made (`serve.export: false`)."""

    def save(self, run: RunDir) -> None:
        run.final_json.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, run: RunDir) -> "FinalRecord":
        return _read(run.final_json, lambda p: cls(**json.loads(p.read_text())), _final_again(run))


def save_results(run: RunDir, results: dict[str, Any]) -> None:
    """`results.json` (`kdray.report.results`, checked against its schema before this)."""
    run.results.write_text(json.dumps(results, indent=2))


def load_results(run: RunDir) -> dict[str, Any]:
    return _read(run.results, lambda p: json.loads(p.read_text()), f"rebuild the report: `kdray report --run {run.root}`")
