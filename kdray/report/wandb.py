"""The final wandb run: the comparison table, the error analysis and the plots."""

from __future__ import annotations

import os
from typing import Any

from kdray import metrics as M
from kdray.artifacts import RunDir
from kdray.report.results import PLOTS, SHAPE_PLOTS
from kdray.wandb_setup import wandb_target


def log_wandb(run: RunDir, results: dict[str, Any], mode: str) -> str | None:
    """A final run in the search's wandb group: the comparison as a `wandb.Table`, plots as images."""
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    name = results["run"]["name"]
    wb = wandb.init(**wandb_target(), group=name, name=f"{name}-final", job_type="final", dir=str(run.root),
                     mode=mode, config={"budget": results["run"]["budget"], "best": results["search"]["best"],
                                        "seeds": results["final"]["seeds"]}, reinit="finish_previous")
    columns = ["model", "trainable_params", "total_params", "size_mb", "test_accuracy", "test_accuracy_std",
               "test_f1_macro", "latency_ms_p50", "latency_ms_p95", "throughput_per_s", "peak_memory_mb"]
    table = wandb.Table(columns=columns)
    for m, b in results["benchmark"].items():
        if m == "teacher":
            acc, std, f1, trainable = results["teacher"][M.TEST_ACCURACY], None, results["teacher"][M.TEST_F1], \
                b["total_params"]
        else:
            v = results["variants"]["student" if m.startswith("student") else m]
            acc, std, f1, trainable = v[M.TEST_ACCURACY]["mean"], v[M.TEST_ACCURACY]["std"], v[M.TEST_F1]["mean"], \
                v[M.TRAINABLE_PARAMS]
        table.add_data(m, trainable, b["total_params"], b["size_mb"], acc, std, f1, b["latency_ms_p50"],
                       b["latency_ms_p95"], b["throughput_per_s"], b["peak_memory_mb"])
    errors = wandb.Table(columns=["bucket", "examples", "errors", "error_rate", "teacher_error_rate"])
    for b in results["error_analysis"]["buckets"]:
        errors.add_data(b["bucket"], b["examples"], b["errors"], b["error_rate"], b["teacher_error_rate"])
    images = {f"plots/{p}": wandb.Image(str(run.root / rel), caption={**PLOTS, **SHAPE_PLOTS}[p]) for p, rel in results["plots"].items()}
    wb.log({"comparison": table, "error_analysis": errors, **images})
    wb.summary.update({M.TEST_ACCURACY: results["variants"]["student"][M.TEST_ACCURACY]["mean"],
                        "teacher/" + M.TEST_ACCURACY: results["teacher"][M.TEST_ACCURACY],
                        M.TRAINABLE_PARAMS: results["search"]["best"][M.TRAINABLE_PARAMS],
                        **{f"comparison/{k}": v for k, v in results["comparison"]["student_vs_teacher"].items()}})
    run_id = wb.id
    wb.finish()
    return run_id
