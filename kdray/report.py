"""Report stage: turn a run directory into `results.json`, `report.md`, `plots/` and a final wandb run.

Reads only what the earlier stages wrote (`config.yaml`, `best_config.yaml`,
`search/trials.parquet`, `search/summary.json`, `search/optuna.db`, `final/final.json`), so a
report can be rebuilt without training anything:

    python -m kdray.report --run runs/NAME

`results.json` follows `kdray/results.schema.json` (JSON Schema) and is checked against it
before it is written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kdray import metrics as M
from kdray.config import help_epilog
from kdray.errors import UserError, run_cli
from kdray.tracking import wandb_mode_of, wandb_target
from kdray.trials import SHAPE_PARAM, shape_text

#: Trial statuses in the search's plots.
STATUS_COLORS = {"completed": "tab:blue", "stopped early": "tab:orange", "failed": "tab:red"}

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


# ----------------------------------------------------------------------------- results.json


def _portable(text: str) -> str:
    """`text` without the absolute paths of the machine that made it (a data file, a model
    directory): each becomes its last component."""
    return re.sub(r"(?<![\w.])/(?:[^\s/:]+/)*([^\s/:]+)", r"\1", text)


def build_results(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows, as plain data (validated against the schema)."""
    import pyarrow.parquet as pq

    from kdray.machine import package_version
    from kdray.trials import status_counts

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    best = yaml.safe_load((run_dir / "best_config.yaml").read_text())
    final = json.loads((run_dir / "final" / "final.json").read_text())
    rows = pq.read_table(run_dir / "search" / "trials.parquet").to_pylist()
    summary_file = run_dir / "search" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    bench, variants = final["benchmark"], final["variants"]

    comparison: dict[str, Any] = {}
    t, s = bench["teacher"], bench["student"]
    comparison["student_vs_teacher"] = {
        "test_accuracy_drop_pt": 100 * (final["teacher"][M.TEST_ACCURACY] - variants["student"][M.TEST_ACCURACY]["mean"]),
        "total_params_ratio": t["total_params"] / s["total_params"],
        "size_ratio": t["size_mb"] / s["size_mb"],
        "latency_speedup_p50": t["latency_ms_p50"] / s["latency_ms_p50"],
        "throughput_ratio": s["throughput_per_s"] / t["throughput_per_s"],
    }
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
    comparison["merge_max_abs_logit_diff"] = final["merge_max_abs_logit_diff"]

    counts = status_counts(rows)
    budget = int(cfg["budget"])
    return {
        "schema": SCHEMA_ID,
        "run": {"name": cfg["name"], "budget": cfg["budget"], "seed": cfg["seed"],
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "versions": {p: package_version(p) for p in ("kdray", "torch", "transformers", "peft", "ray", "optuna")},
                "data": {**final["data"], "description": _portable(final["data"]["description"])},
                "teacher_model": _portable(final["teacher"]["model"]),
                "student_model": _portable(cfg["student"]["name"] or f"inline {cfg['student']['config']['model_type']} config")
                + (" (started from the fine-tuned teacher's weights: student.init teacher)"
                   if cfg["student"].get("init") == "teacher" else "")},
        "search": {"trials": len(rows), "completed": counts["completed"], "stopped_early": counts["stopped early"],
                   "failed": counts["failed"], "rejected_over_budget": summary.get("rejected"),
                   "seconds": summary.get("seconds"), "test_reads": summary.get("test_reads"), "best": best,
                   "trials_table": [{**{k: r[k] for k in ("trial_id", "alpha", "temperature", "learning_rate", "lora_r",
                                                           "lora_alpha", "target_modules", "layers", M.TRAINABLE_PARAMS,
                                                           "best_val_accuracy", "epochs_run", "status")},
                                     # Runs from before shapes were searched have neither column.
                                     SHAPE_PARAM: r.get(SHAPE_PARAM), M.LATENCY_MS: r.get(M.LATENCY_MS)}
                                    for r in rows]},
        "teacher": final["teacher"],
        "final": {**{k: final[k] for k in ("seeds", "device", "device_type", "train_seconds", "seconds")},
                  # Relative to the run directory: the report reads the same wherever it is copied.
                  **{k: os.path.relpath(final[k], run_dir) for k in ("student_dir", "adapter_dir")},
                  "reused_search_trial": final.get("reused_search_trial")},
        "variants": variants,
        "benchmark": bench,
        "comparison": comparison,
        "claims": claims(comparison, best[M.TRAINABLE_PARAMS], budget, cfg.get("final", {}),
                         final["teacher"][M.TEST_ACCURACY], variants["student"][M.TEST_ACCURACY]["mean"]),
        "error_analysis": final["error_analysis"],
        "plots": {name: f"plots/{name}.png" for name in
                  [*PLOTS, *(SHAPE_PLOTS if any(r.get(M.LATENCY_MS) is not None for r in rows) else [])]},
    }


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


def _teacher_rows(teacher: dict[str, Any]) -> str:
    # Runs from before the record kept it, and fine-tuned teachers (epochs 0), say nothing.
    n = teacher.get("train_examples")
    return f", fine-tuned on {n:,} labelled rows" if n and teacher.get("epochs") else ""


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


# ----------------------------------------------------------------------------- plots


def make_plots(run_dir: Path, results: dict[str, Any]) -> dict[str, str]:
    """Write `plots/*.png`; returns name -> why a plot could not be drawn (empty when all were)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    rows = pq.read_table(run_dir / "search" / "trials.parquet").to_pylist()
    best = results["search"]["best"]
    budget = results["run"]["budget"]
    skipped: dict[str, str] = {}

    scored = [r for r in rows if r["best_val_accuracy"] is not None]
    chosen = next((r for r in scored if r["trial_id"] == best["trial_id"]), None)
    fig, ax = _front(plt, scored, M.TRAINABLE_PARAMS, chosen)
    ax.axvline(budget, c="red", ls="--", label=f"budget {budget:,}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_title("Search: accuracy vs trainable parameters")
    ax.legend(fontsize=8, loc="best")
    _save(fig, out / "pareto.png")
    if "latency" in results["plots"]:  # the student's shapes were timed: accuracy vs speed
        fig, ax = _front(plt, [r for r in scored if r.get(M.LATENCY_MS) is not None], M.LATENCY_MS, chosen)
        ax.set_xlabel("batch-1 latency, ms (p50, measured before the search)")
        ax.set_title("Search: accuracy vs latency (each student shape)")
        ax.legend(fontsize=8, loc="best")
        _save(fig, out / "latency.png")

    # Parameter importances (fANOVA) on the trials that trained.
    try:
        importances = param_importances(run_dir, results["run"]["name"], results["run"]["seed"])
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(importances) + 1.5))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance for validation accuracy (fANOVA)")
        ax.set_title(f"Optuna parameter importances ({sum(r['best_val_accuracy'] is not None for r in rows)} trials)")
        _save(fig, out / "importances.png")
    except (ValueError, RuntimeError) as e:
        skipped["importances"] = str(e)
        _placeholder(plt, out / "importances.png", f"no importances: {e}")

    # Validation curves per trial.
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        acc = r["val_accuracy_per_epoch"]
        if not acc:
            continue
        chosen = r["trial_id"] == best["trial_id"]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", c="black" if chosen else STATUS_COLORS.get(r["status"], "gray"),
                lw=2.5 if chosen else 1, alpha=0.8, zorder=4 if chosen else 2)
        if r["status"] == "stopped early":
            ax.scatter([len(acc)], [acc[-1]], marker="x", s=80, c="black", zorder=5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation accuracy per epoch of every trial")
    ax.legend(handles=[Line2D([], [], c=STATUS_COLORS["completed"], marker="o", label="completed"),
                       Line2D([], [], c=STATUS_COLORS["stopped early"], marker="o", label="stopped early (x: ASHA)"),
                       Line2D([], [], c="black", lw=2.5, marker="o", label="chosen")], fontsize=8, loc="best")
    _save(fig, out / "curves.png")

    # Confusion matrices: teacher and chosen student on test.
    names = results["run"]["data"]["label_names"]
    chosen = results["variants"]["student"]["chosen_seed"]
    s_cm = next(r for r in results["variants"]["student"]["runs"] if r["seed"] == chosen)["confusion"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(names) * 2, 2.5 + 0.9 * len(names)))
    for ax, (title, cm) in zip(axes, (("teacher", results["teacher"]["confusion"]), ("student", s_cm))):
        cm = np.asarray(cm)
        ax.imshow(cm, cmap="Blues")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} (test)")
    _save(fig, out / "confusion.png")

    # Latency and size.
    bench = results["benchmark"]
    models = list(bench)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    p50 = [bench[m]["latency_ms_p50"] for m in models]
    p95 = [bench[m]["latency_ms_p95"] for m in models]
    x = np.arange(len(models))
    a1.bar(x - 0.2, p50, 0.4, label="p50")
    a1.bar(x + 0.2, p95, 0.4, label="p95")
    a1.set_xticks(x, models, rotation=25, ha="right")
    a1.set_ylabel("ms per example (batch 1)")
    a1.set_title(f"latency on {results['final']['device_type']}")
    a1.legend()
    a2.bar(x, [bench[m]["size_mb"] for m in models], color="tab:green")
    a2.set_xticks(x, models, rotation=25, ha="right")
    a2.set_ylabel("MB (safetensors)")
    a2.set_title("size")
    _save(fig, out / "latency_size.png")
    return skipped


#: fANOVA fits a random forest to (knobs -> accuracy): below this many completed trials its
#: ranking of 8-10 knobs says more about the forest than about the knobs.
MIN_IMPORTANCE_TRIALS = 10


def _front(plt: Any, rows: list[dict], x: str, chosen: dict | None) -> tuple[Any, Any]:
    """Validation accuracy of every scored trial against `x` (lower is better), coloured by
    status, the Pareto front of the completed trials and the chosen trial as a star."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for status, color in STATUS_COLORS.items():
        pts = [r for r in rows if r["status"] == status]
        if pts:
            ax.scatter([r[x] for r in pts], [r["best_val_accuracy"] for r in pts], c=color, label=status, alpha=0.8)
    # The front joins trials that ran all their epochs: a trial ASHA stopped after one epoch is
    # plotted (orange) but is not comparable with full runs, so it never shapes the front.
    front, top = [], -1.0
    for r in sorted((r for r in rows if r["status"] == "completed"), key=lambda r: (r[x], -r["best_val_accuracy"])):
        if r["best_val_accuracy"] > top:
            front.append(r)
            top = r["best_val_accuracy"]
    if front:
        ax.step([r[x] for r in front], [r["best_val_accuracy"] for r in front], where="post",
                c="gray", lw=1, label="Pareto front (completed trials)")
    if chosen is not None:
        ax.scatter([chosen[x]], [chosen["best_val_accuracy"]], marker="*", s=300, c="gold",
                   edgecolors="black", zorder=5, label="chosen")
    ax.set_ylabel("best validation accuracy")
    return fig, ax


def param_importances(run_dir: Path, study_name: str, seed: int) -> dict[str, float]:
    """fANOVA importances over the trials that trained (over-budget rejections left out)."""
    import optuna

    from kdray.trials import REJECTED_ATTR

    storage = f"sqlite:///{run_dir / 'search' / 'optuna.db'}"
    study = optuna.load_study(study_name=study_name, storage=storage)
    trained = [t for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
               if not t.user_attrs.get(REJECTED_ATTR)]
    if len(trained) < MIN_IMPORTANCE_TRIALS:
        raise ValueError(f"{len(trained)} completed trial(s); importances need at least {MIN_IMPORTANCE_TRIALS}, "
                         f"fewer make fANOVA's ranking noise")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" line
    clean = optuna.create_study(direction=study.direction)
    clean.add_trials(trained)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return optuna.importance.get_param_importances(clean, evaluator=evaluator)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _placeholder(plt: Any, path: Path, text: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    _save(fig, path)


# ----------------------------------------------------------------------------- report.md


def _pm(stat: dict[str, Any], scale: float = 100, digits: int = 1) -> str:
    if stat["std"] is None:
        return f"{scale * stat['mean']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _pt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1f} pt"


def _verdict(c: dict[str, Any]) -> str:
    """Whether a difference of means stands out from the seed-to-seed spread: it is compared
    with the standard error of the difference, sqrt((s1^2 + s2^2) / n)."""
    diff = c["test_accuracy_diff_pt"]
    se = _standard_error(c)
    if se is None:
        return f" -> {'yes' if diff > 0 else 'no'}, from a single seed (no spread to compare with)"
    spread = f" (seed std {c['student_std_pt']:.1f} vs {c['baseline_std_pt']:.1f} pt; standard error of the " \
             f"difference {se:.1f} pt)"
    if diff <= 0:
        return spread + " -> no"
    if se == 0 or diff < CLAIM_SE * se:
        return spread + f" -> not clearly: {diff / se:.1f} standard errors, under {CLAIM_SE:g}" if se > 0 else \
            spread + " -> not clearly: no seed-to-seed spread to judge by"
    return spread + f" -> yes, {diff / se:.1f} standard errors"


def _truncation_sentence(data: dict[str, Any]) -> str:
    if "max_length" not in data:
        return ""
    return (f" Texts are cut to {data['max_length']} tokens, {data['truncation']}: {100 * data['truncated_share']:.0f}% "
            f"of the test texts were longer (median {data['median_tokens']:.0f} tokens).")


def _test_split_sentence(during_search: list[str] | None, by_final: list[str] | None) -> str:
    """What the run recorded about the test split (`TaskData.test_reads`), in words."""
    if during_search is None or by_final is None:
        return "This run did not record who read the test split."
    if during_search:
        return (f"**Warning: the test split was opened during the search (by {', '.join(during_search)}): "
                "selection may have seen it.**")
    return (f"Selection used the validation split only: nothing had opened the test split when the search ended; "
            f"the final stage opened it {len(by_final)} time(s) ({', '.join(by_final)}).")


def render_markdown(results: dict[str, Any], skipped: dict[str, str]) -> str:
    run, search, teacher = results["run"], results["search"], results["teacher"]
    variants, bench, cmp_ = results["variants"], results["benchmark"], results["comparison"]
    best, fin = search["best"], results["final"]
    st = cmp_["student_vs_teacher"]
    s_acc = variants["student"][M.TEST_ACCURACY]
    lines = [
        f"# kdray report: {run['name']}",
        "",
        f"Data: {run['data']['description']}. Teacher: {run['teacher_model']}{_teacher_rows(teacher)}. "
        f"Student: {run['student_model']}, "
        f"budget {run['budget']:,} trainable parameters.{_truncation_sentence(run['data'])}",
        "",
        f"**The student keeps {100 * s_acc['mean']:.1f}% test accuracy against the teacher's "
        f"{100 * teacher[M.TEST_ACCURACY]:.1f}% ({-st['test_accuracy_drop_pt']:+.1f} pt), with "
        f"{best[M.TRAINABLE_PARAMS]:,} trainable parameters ({100 * best[M.TRAINABLE_PARAMS] / run['budget']:.1f}% of "
        f"the budget), {st['total_params_ratio']:.1f}x fewer parameters in all, {st['size_ratio']:.1f}x smaller on "
        f"disk and {st['latency_speedup_p50']:.2f}x faster at batch 1 on {fin['device']}.**",
        "",
        f"{_test_split_sentence(search['test_reads'], run['data'].get('test_reads'))} "
        f"Test figures of the retrained models are mean ± std over {fin['seeds']} seed(s).",
        "",
        "| claim | target | measured | holds |",
        "|---|---|---|---|",
        *(f"| {c['claim']} | {c['target']} | {c['measured']} | "
          f"{'-' if c['holds'] is None else ('yes' if c['holds'] else '**no**')} |" for c in results["claims"]),
        "",
        "## Search",
        "",
        f"{search['trials']} trials trained ({search['completed']} completed, {search['stopped_early']} stopped early "
        f"by ASHA, {search['failed']} failed)"
        + (f"; {search['rejected_over_budget']} sampled configurations were infeasible (over the parameter budget, or a too-slow shape) and rejected before training"
           if search["rejected_over_budget"] is not None else "")
        + (f"; {search['seconds']:.0f} s" if search["seconds"] is not None else "") + ".",
        "",
        f"Best (validation accuracy {best['best_val_accuracy']:.4f}): alpha {best['train']['alpha']:.3f}, "
        f"T {best['train']['temperature']:.2f}, learning rate {best['train']['learning_rate']:.2e}, "
        f"{best['train']['epochs']} epoch(s), LoRA r {best['student']['lora']['r']}, "
        f"alpha {best['student']['lora']['alpha']:g}, dropout {best['student']['lora']['dropout']:.2f}, modules "
        f"{','.join(best['student']['lora']['target_modules'])}, layers "
        f"{best['student']['lora']['layers'] if best['student']['lora']['layers'] is not None else 'all'}"
        + (f"; student shape: layers {shape_text(best['student']['keep_layers'])} of the model" if "keep_layers" in
           best["student"] else "") + ".",
        "",
    ]
    timed = "latency" in results["plots"]
    shape_cols = ("| shape | ms (batch 1) ", "|---|---") if timed else ("", "")
    lines += [f"| trial | alpha | T | lr | r | modules | layers {shape_cols[0]}| trainable params | best val acc | epochs "
              f"| status |", f"|---|---|---|---|---|---|---{shape_cols[1]}|---|---|---|---|"]
    for r in sorted(search["trials_table"], key=lambda r: -(r["best_val_accuracy"] or 0)):
        acc = "n/a" if r["best_val_accuracy"] is None else f"{r['best_val_accuracy']:.4f}"
        mark = " **(chosen)**" if r["trial_id"] == best["trial_id"] else ""
        shape = f"| {r.get(SHAPE_PARAM) or 'as configured'} | {r[M.LATENCY_MS]:.2f} " if timed else ""
        lines.append(f"| {r['trial_id']}{mark} | {r['alpha']:.2f} | {r['temperature']:.2f} | {r['learning_rate']:.1e} "
                     f"| {r['lora_r']} | {r['target_modules']} | {r['layers']} {shape}| {r[M.TRAINABLE_PARAMS]:,} | {acc} "
                     f"| {r['epochs_run']} | {r['status']} |")
    lines += ["", "![Pareto front](plots/pareto.png)", ""]
    if timed:
        lines += ["![Accuracy vs latency](plots/latency.png)", ""]
    lines += ["![Validation curves](plots/curves.png)", ""]
    if "importances" in skipped:
        lines += [f"Parameter importances: not computed ({skipped['importances']}).", ""]
    else:
        lines += ["![Parameter importances](plots/importances.png)", ""]

    lines += [
        "## Teacher vs student vs baselines",
        "",
        f"Test split: {run['data']['sizes']['test']:,} examples. Latency: batch 1, p50/p95 over "
        f"{bench['student']['latency_runs']} runs after warm-up; throughput: the whole test split at batch "
        f"{bench['student']['throughput_batch_size']}; memory: {bench['student']['memory_kind'].replace('_', ' ')}; "
        f"device: {fin['device']}.",
        "",
        "| model | trainable params | total params | size MB | test acc % | macro-F1 % | precision % | recall % "
        "| p50 ms | p95 ms | examples/s | peak mem MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in bench.items():
        if name == "teacher":
            trainable = b["total_params"]  # fully fine-tuned
            acc, f1, pr, rc = (f"{100 * teacher[k]:.1f}" for k in (M.TEST_ACCURACY, M.TEST_F1, M.TEST_PRECISION,
                                                                     M.TEST_RECALL))
        else:
            v = variants["student" if name.startswith("student") else name]
            trainable = v[M.TRAINABLE_PARAMS]
            acc, f1, pr, rc = (_pm(v[k]) for k in (M.TEST_ACCURACY, M.TEST_F1, M.TEST_PRECISION, M.TEST_RECALL))
        lines.append(f"| {name} | {trainable:,} | {b['total_params']:,} | {b['size_mb']:.1f} | {acc} | {f1} | {pr} | "
                     f"{rc} | {b['latency_ms_p50']:.2f} | {b['latency_ms_p95']:.2f} | {b['throughput_per_s']:.0f} | "
                     f"{b['peak_memory_mb']:.0f} |")
    lines += [
        "",
        "The merged and unmerged student are the same weights: their test accuracy is the chosen seed's "
        "row of the student (the table shows the student's mean over seeds for both).",
        f"Merged vs unmerged logits on the test split differ by at most {cmp_['merge_max_abs_logit_diff']:.1e}.",
    ]
    if "merged_vs_plain_latency_ratio" in cmp_:
        lines.append(f"Merged student latency / plain model of the same architecture (head-only baseline): "
                     f"{cmp_['merged_vs_plain_latency_ratio']:.3f} (LoRA costs nothing once merged); unmerged / merged: "
                     f"{bench['student_unmerged']['latency_ms_p50'] / bench['student']['latency_ms_p50']:.3f}.")
    lines += ["", "![Latency and size](plots/latency_size.png)", "", "### Did distillation and LoRA earn their keep?", ""]
    for key, what, _, claim in SEED_CLAIMS:
        if key not in cmp_:
            continue
        c = cmp_[key]
        lines.append(f"- {what}: {_pt(c['test_accuracy_diff_pt'])} test accuracy, mean over {c['seeds']} seed(s)"
                     f"{_verdict(c)} ({claim}).")
    reused = (f" The student's seed {run['seed']} run is the search's trial {fin['reused_search_trial']} itself "
              "(same configuration and seed: a retrain would repeat it)." if fin.get("reused_search_trial") else "")
    lines += ["", f"Per seed (validation accuracy decides which seed ships).{reused}", "",
              "| model | seed | val acc | test acc | test macro-F1 |", "|---|---|---|---|---|"]
    for name, v in variants.items():
        for r in v["runs"]:
            mark = " (shipped)" if name == "student" and r["seed"] == v["chosen_seed"] else ""
            lines.append(f"| {name}{mark} | {r['seed']} | {r[M.VAL_ACCURACY]:.4f} | {r[M.TEST_ACCURACY]:.4f} | "
                         f"{r[M.TEST_F1]:.4f} |")

    ea = results["error_analysis"]
    lines += [
        "", "## Error analysis", "",
        f"The shipped student misclassifies {ea['errors']} of {ea['test_examples']} test examples "
        f"({100 * ea['error_rate']:.1f}%; the teacher {ea['teacher_errors']}). Buckets (a class pair's rate is among "
        f"the examples of its true class):", "",
        "| bucket | examples | student errors | student error rate | teacher error rate |", "|---|---|---|---|---|",
    ]
    for b in ea["buckets"]:
        rate = "n/a" if b["error_rate"] is None else f"{100 * b['error_rate']:.1f}%"
        trate = "n/a" if b["teacher_error_rate"] is None else f"{100 * b['teacher_error_rate']:.1f}%"
        lines.append(f"| {b['bucket']} | {b['examples']} | {b['errors']} | {rate} | {trate} |")
    lines += ["", "Most confident mistakes per bucket:", ""]
    for b in ea["buckets"]:
        if not b["shown"]:
            continue
        lines.append(f"**{b['bucket']}**")
        lines.append("")
        for e in b["shown"]:
            text = e["text"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"- \"{text}\" — true {e['label']}, predicted {e['predicted']} ({e['probability']:.2f})")
        lines.append("")
    lines += ["![Confusion matrices](plots/confusion.png)", "", "## Files", "",
              f"- `final/student/`: the merged student with its tokenizer; "
              f"`transformers.pipeline(\"text-classification\", model=\"{fin['student_dir']}\")` loads it from the run "
              f"directory, `kdray predict --model {fin['student_dir']} \"some text\"` prints a label.",
              "- `final/adapter/`: the chosen seed's unmerged PEFT adapter (LoRA + head).",
              "- `results.json`: every number here (schema: `kdray/results.schema.json`); `search/trials.parquet`: "
              "every trial; `final/predictions.parquet`: test predictions of student and teacher.",
              f"- Versions: {', '.join(f'{k} {v}' for k, v in run['versions'].items())}.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- wandb


def log_wandb(run_dir: Path, results: dict[str, Any], mode: str) -> str | None:
    """A final run in the search's wandb group: the comparison as a `wandb.Table`, plots as images."""
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    name = results["run"]["name"]
    run = wandb.init(**wandb_target(), group=name, name=f"{name}-final", job_type="final", dir=str(run_dir),
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
    images = {f"plots/{p}": wandb.Image(str(run_dir / rel), caption={**PLOTS, **SHAPE_PLOTS}[p]) for p, rel in results["plots"].items()}
    run.log({"comparison": table, "error_analysis": errors, **images})
    run.summary.update({M.TEST_ACCURACY: results["variants"]["student"][M.TEST_ACCURACY]["mean"],
                        "teacher/" + M.TEST_ACCURACY: results["teacher"][M.TEST_ACCURACY],
                        M.TRAINABLE_PARAMS: results["search"]["best"][M.TRAINABLE_PARAMS],
                        **{f"comparison/{k}": v for k, v in results["comparison"]["student_vs_teacher"].items()}})
    run_id = run.id
    run.finish()
    return run_id


# ----------------------------------------------------------------------------- the stage


def write_report(run_dir: Path, *, wandb_mode: str = "offline") -> dict[str, Any]:
    """Write `results.json`, `plots/`, `report.md` into `run_dir` and log the final wandb run."""
    results = build_results(run_dir)
    skipped = make_plots(run_dir, results)
    results["plots_skipped"] = skipped
    results["wandb"] = {"mode": wandb_mode, "run_id": log_wandb(run_dir, results, wandb_mode)}
    validate(results)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    (run_dir / "report.md").write_text(render_markdown(results, skipped))
    print(f"report: {run_dir / 'report.md'}, {run_dir / 'results.json'}, {run_dir / 'plots'}/")
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


#: What `--help` shows as examples.
EXAMPLES = (
    'kdray report --run runs/default',
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="kdray report", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_epilog(*EXAMPLES),
        description=(
        "Rebuild results.json, report.md and plots/ of a run whose final stage has run (trains nothing)."))
    ap.add_argument("--run", required=True, help="run directory (runs/<name>/)")
    ap.add_argument("--wandb", choices=["online", "offline", "disabled"],
                    help="wandb mode of the final run (default: online with WANDB_API_KEY set, else offline)")
    ap.add_argument("--export", metavar="DIR", help="also copy report.md, results.json and plots/ to DIR")
    args = ap.parse_args(argv)
    run_dir = Path(args.run).resolve()
    if not (run_dir / "final" / "final.json").is_file():
        raise UserError(f"--run {args.run}: no final stage in it (final/final.json). Fix: run "
                        f"`python -m kdray.final --run {args.run}` first.")
    write_report(run_dir, wandb_mode=wandb_mode_of(args.wandb))
    if args.export is not None:
        export(run_dir, Path(args.export))
    return 0


if __name__ == "__main__":
    run_cli(main)
