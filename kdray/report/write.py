"""Report stage: turn a run directory into `results.json`, `report.md`, `plots/` and a final wandb run.

Reads only what the earlier stages wrote (`config.yaml`, `best_config.yaml`,
`search/trials.parquet`, `search/summary.json`, `search/optuna.db`, `final/final.json`), so a
report can be rebuilt without training anything:

    kdray report --run runs/NAME

`results.json` follows `kdray/report/results.schema.json` (JSON Schema) and is checked against it
before it is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdray.artifacts import FinalRecord, RunDir, SearchResult, save_results
from kdray.report.markdown import render_markdown
from kdray.report.plots import make_plots
from kdray.report.results import build_results, validate
from kdray.report.wandb import log_wandb


def write_report(run_dir: Path, *, wandb_mode: str = "offline") -> dict[str, Any]:
    """Write `results.json`, `plots/`, `report.md` into `run_dir` and log the final wandb run,
    from the run's config and its search's and final stage's artefacts alone."""
    from kdray.config import load_config

    run = RunDir(Path(run_dir))
    final = FinalRecord.load(run)  # first: a report is of the final stage, and needs it most
    search = SearchResult.load(run)
    results = build_results(run, load_config(run.config), search, final)
    skipped = make_plots(run, search.rows, results)
    results["plots_skipped"] = skipped
    results["wandb"] = {"mode": wandb_mode, "run_id": log_wandb(run, results, wandb_mode)}
    validate(results)
    save_results(run, results)
    run.report.write_text(render_markdown(results, skipped))
    print(f"report: {run.report}, {run.results}, {run.plots}/")
    return results


def export(run_dir: Path, dest: Path) -> None:
    """Copy `report.md`, `results.json` and `plots/` of `run_dir` to `dest` (replacing its plots)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "results.json"):
        shutil.copy2(run_dir / name, dest / name)
    shutil.rmtree(dest / "plots", ignore_errors=True)
    shutil.copytree(run_dir / "plots", dest / "plots")
    print(f"report: exported to {dest}/")
