"""The run directory, `runs/<name>/`: every path a stage writes or reads, defined once.

A reviewer can read a run without kdray (DESIGN.md, "The run directory"); the stages find each
other's outputs here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
        """The resolved config (`kdray.config.to_dict`)."""
        return self.root / "config.yaml"

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
        """One row per trial (`kdray.study.trial_rows`)."""
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

    # the report
    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"
