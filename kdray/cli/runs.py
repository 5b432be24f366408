"""`kdray runs`: the runs in an output directory, each with how far it got and its best results.

Reads only what the stages wrote (`kdray.artifacts.RunDir`): no Ray, no torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from kdray.artifacts import RunDir
from kdray.cli import flags
from kdray.errors import UserError


def run_row(run: RunDir) -> dict:
    """One run: its stage, trials, best validation accuracy, and test accuracies once reported."""
    row: dict = {"name": run.root.name, "stage": "started", "trials": None, "best_val_accuracy": None,
                 "student_test_accuracy": None, "teacher_test_accuracy": None}
    if run.summary.is_file():
        row["stage"] = "searched"
        row["trials"] = json.loads(run.summary.read_text()).get("trials")
    if run.best_config.is_file():
        row["best_val_accuracy"] = (yaml.safe_load(run.best_config.read_text()) or {}).get("best_val_accuracy")
    if run.final_json.is_file():
        row["stage"] = "final"
    if run.results.is_file():
        results = json.loads(run.results.read_text())
        row["stage"] = "reported"
        runs = results.get("variants", {}).get("student", {}).get("runs", [])
        accs = [r["test/accuracy"] for r in runs if "test/accuracy" in r]
        row["student_test_accuracy"] = sum(accs) / len(accs) if accs else None
        row["teacher_test_accuracy"] = results.get("teacher", {}).get("test/accuracy")
    return row


def list_runs(output_dir: Path) -> list[dict]:
    return [run_row(RunDir(p.resolve())) for p in sorted(output_dir.iterdir()) if (p / "config.yaml").is_file()]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


DESCRIPTION = ("List the runs in an output directory: stage reached, trials, best validation accuracy, and the "
               "student's and teacher's test accuracy.")
EXAMPLES = ("kdray runs", "kdray runs --output-dir /data/kdray-runs")


def arguments(ap: argparse.ArgumentParser) -> None:
    flags.add_output_dir(ap)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output_dir)
    if not out.is_dir():
        raise UserError(f"--output-dir {args.output_dir}: no such directory. Fix: pass the --output-dir your "
                        f"searches used (default ./runs).")
    rows = list_runs(out)
    if not rows:
        print(f"no runs in {out} (a run is a directory holding config.yaml)")
        return 0
    width = max(4, *(len(r["name"]) for r in rows))
    print(f"{'name':<{width}}  {'stage':<9} {'trials':>6} {'best val %':>10} {'student test %':>14} "
          f"{'teacher test %':>14}")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['stage']:<9} {r['trials'] if r['trials'] is not None else '-':>6} "
              f"{_pct(r['best_val_accuracy']):>10} {_pct(r['student_test_accuracy']):>14} "
              f"{_pct(r['teacher_test_accuracy']):>14}")
    return 0
