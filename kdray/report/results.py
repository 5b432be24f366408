"""`results.json`: everything the report shows, as plain data, checked against
`kdray/report/results.schema.json`; and the claims a run is checked against."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from pathlib import Path
from typing import Any

from kdray import metrics as M
from kdray.artifacts import FinalRecord, RunDir, SearchResult, TrialRow, status_counts
from kdray.config import RunConfig
from kdray.trials import SHAPE_PARAM


SCHEMA_PATH = Path(__file__).resolve().parent / "results.schema.json"
SCHEMA_ID = "kdray-results/1"


PLOTS = {
    "pareto": "validation accuracy vs trainable parameters of every trial",
    "importances": "Optuna parameter importances (fANOVA) on validation accuracy",
    "curves": "validation accuracy per epoch of every trial",
    "confusion": "test confusion matrices, teacher and student",
    "latency_size": "latency at batch 1 and size, every benchmarked model",
}
#: Drawn only when the search timed its student shapes (`space.keep_layers` or a latency budget).
SHAPE_PLOTS = {"latency": "validation accuracy vs batch-1 latency of every trial"}


def _portable(text: str) -> str:
    """`text` without the absolute paths of the machine that made it (a data file, a model
    directory): each becomes its last component."""
    return re.sub(r"(?<![\w.])/(?:[^\s/:]+/)*([^\s/:]+)", r"\1", text)


def build_results(run: RunDir, cfg: RunConfig, search: SearchResult, final: FinalRecord) -> dict[str, Any]:
    """Everything the report shows, as plain data (validated against the schema), from the run's
    config and the search's and the final stage's artefacts."""
    from kdray.machine import package_version

    rows, best = search.rows, search.best
    counts = status_counts(rows)
    comparison = _comparison(final)
    student = cfg.student.name or f"inline {cfg.student.config['model_type']} config"
    return {
        "schema": SCHEMA_ID,
        "run": {"name": cfg.name, "budget": cfg.budget, "seed": cfg.seed,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "versions": {p: package_version(p) for p in ("kdray", "torch", "transformers", "peft", "ray", "optuna")},
                "data": {**final.data, "description": _portable(final.data["description"])},
                "teacher_model": _portable(final.teacher["model"]),
                "student_model": _portable(student) + (" (started from the fine-tuned teacher's weights: student.init "
                                                       "teacher)" if cfg.student.init == "teacher" else "")},
        "search": {"trials": len(rows), "completed": counts["completed"], "stopped_early": counts["stopped early"],
                   "failed": counts["failed"], "rejected_over_budget": search.summary.rejected,
                   "seconds": search.summary.seconds, "test_reads": search.summary.test_reads,
                   "best": best.to_yaml(), "trials_table": [_table_row(r) for r in rows]},
        "teacher": final.teacher,
        "final": {"seeds": final.seeds, "device": final.device, "device_type": final.device_type,
                  "train_seconds": final.train_seconds, "seconds": final.seconds,
                  # Relative to the run directory: the report reads the same wherever it is copied.
                  "student_dir": os.path.relpath(final.student_dir, run.root),
                  "adapter_dir": os.path.relpath(final.adapter_dir, run.root),
                  "reused_search_trial": final.reused_search_trial},
        "variants": final.variants,
        "benchmark": final.benchmark,
        "comparison": comparison,
        "claims": claims(comparison, best.trainable_params, cfg.budget, dataclasses.asdict(cfg.final),
                         final.teacher[M.TEST_ACCURACY], final.variants["student"][M.TEST_ACCURACY]["mean"]),
        "error_analysis": final.error_analysis,
        "serving": final.serving,
        "plots": {name: f"plots/{name}.png" for name in
                  [*PLOTS, *(SHAPE_PLOTS if any(r.latency_ms is not None for r in rows) else [])]},
    }


def _table_row(r: TrialRow) -> dict[str, Any]:
    """A trial as the report's table shows it."""
    row = r.config.to_row()
    return {"trial_id": r.trial_id, **{k: row[k] for k in ("alpha", "temperature", "learning_rate", "lora_r",
                                                            "lora_alpha", "lora_variant", "target_modules", "layers",
                                                            M.TRAINABLE_PARAMS, SHAPE_PARAM)},
            "best_val_accuracy": r.best_val_accuracy, "epochs_run": r.epochs_run, "status": r.status,
            M.LATENCY_MS: r.latency_ms, "latency_runtime": r.latency_runtime}


def _comparison(final: FinalRecord) -> dict[str, Any]:
    """The student against the teacher and each baseline, and the merge check."""
    bench, variants = final.benchmark, final.variants
    t, s = bench["teacher"], bench["student"]
    comparison: dict[str, Any] = {"student_vs_teacher": {
        "test_accuracy_drop_pt": 100 * (final.teacher[M.TEST_ACCURACY] - variants["student"][M.TEST_ACCURACY]["mean"]),
        "total_params_ratio": t["total_params"] / s["total_params"],
        "size_ratio": t["size_mb"] / s["size_mb"],
        "latency_speedup_p50": t["latency_ms_p50"] / s["latency_ms_p50"],
        "throughput_ratio": s["throughput_per_s"] / t["throughput_per_s"],
    }}
    for key, base in (("kd_vs_no_kd", "no_kd"), ("lora_vs_head_only", "head_only")):
        if base in variants:
            a, b = variants["student"][M.TEST_ACCURACY], variants[base][M.TEST_ACCURACY]
            comparison[key] = {"test_accuracy_diff_pt": 100 * (a["mean"] - b["mean"]),
                               "student_std_pt": None if a["std"] is None else 100 * a["std"],
                               "baseline_std_pt": None if b["std"] is None else 100 * b["std"],
                               "seeds": len(a["values"])}
    if "head_only" in bench:
        # The head-only student is the same architecture with no LoRA layers: a plain model.
        comparison["merged_vs_plain_latency_ratio"] = s["latency_ms_p50"] / bench["head_only"]["latency_ms_p50"]
    comparison["merge_max_abs_logit_diff"] = final.merge_max_abs_logit_diff
    return comparison


#: What kdray's default must show: the student within this many points of the teacher's test
#: accuracy, and at least this much faster at batch 1.
MAX_DROP_PT, MIN_SPEEDUP = 2.0, 1.5
#: The baseline claims: comparison key, the comparison in the report's words, the claim, and
#: what a reference setup measured.
#: A difference "holds" when it is at least this many standard errors of the difference above 0
#: (about 95% one-sided); one standard error would hold by chance one time in six.
CLAIM_SE = 2.0
CLAIM_TARGET = f"> 0 pt by >= {CLAIM_SE:g} standard errors"


SEED_CLAIMS = (
    ("kd_vs_no_kd", "KD vs no KD (alpha = 1)", "KD beats no KD", "reference: +1.4 pt on IMDb, BERT-base to a 4-layer student"),
    ("lora_vs_head_only", "LoRA vs frozen encoder + head", "LoRA beats a frozen encoder + head",
     "reference: +6.4 pt on SST-2, DistilBERT"),
)


def claims(comparison: dict[str, Any], trainable: int, budget: int, final_cfg: dict[str, Any],
           teacher_acc: float, student_acc: float) -> list[dict[str, Any]]:
    """The claims a run is checked against: target, measured, holds (None where not measured)."""
    st = comparison["student_vs_teacher"]
    out = [
        {"claim": f"student within {MAX_DROP_PT:g} pt of the teacher's test accuracy",
         "target": f"drop <= {MAX_DROP_PT:g} pt", "measured": f"{st['test_accuracy_drop_pt']:.1f} pt",
         "holds": st["test_accuracy_drop_pt"] <= MAX_DROP_PT},
        {"claim": "student fits the budget", "target": f"<= {budget:,} trainable",
         "measured": f"{trainable:,}", "holds": trainable <= budget},
        {"claim": f"student at least {MIN_SPEEDUP:g}x faster than the teacher at batch 1 (p50)",
         "target": f">= {MIN_SPEEDUP:g}x", "measured": f"{st['latency_speedup_p50']:.2f}x",
         "holds": st["latency_speedup_p50"] >= MIN_SPEEDUP},
    ]
    for key, _, what, seed in SEED_CLAIMS:
        c = comparison.get(key)
        if c is None:
            out.append({"claim": f"{what} ({seed})", "target": CLAIM_TARGET,
                        "measured": "not run (final.baselines false)", "holds": None})
            continue
        se = _standard_error(c)
        out.append({"claim": f"{what} ({seed})", "target": CLAIM_TARGET,
                    "measured": f"{c['test_accuracy_diff_pt']:+.1f} pt" + ("" if se is None else f" (SE {se:.1f} pt)"),
                    "holds": se is not None and c["test_accuracy_diff_pt"] >= CLAIM_SE * se > 0})
    if final_cfg.get("reference") and final_cfg.get("reference_accuracy") is not None:
        ref = float(final_cfg["reference_accuracy"])
        out.append({"claim": f"reference: {final_cfg['reference']}", "target": f"{100 * ref:.1f}%",
                    "measured": f"teacher {100 * teacher_acc:.1f}%, student {100 * student_acc:.1f}% "
                                f"({100 * (student_acc - ref):+.1f} pt)", "holds": None})
    return out


def _standard_error(c: dict[str, Any]) -> float | None:
    """Standard error of a difference of seed means, sqrt((s1^2 + s2^2) / n); None with one seed."""
    if c["student_std_pt"] is None:
        return None
    return ((c["student_std_pt"] ** 2 + c["baseline_std_pt"] ** 2) / c["seeds"]) ** 0.5


def validate(results: dict[str, Any]) -> None:
    import jsonschema

    jsonschema.validate(results, json.loads(SCHEMA_PATH.read_text()))
