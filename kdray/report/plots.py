"""The report's plots: the Pareto front, accuracy vs latency, importances, curves, confusion
matrices, latency and size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdray.artifacts import RunDir, TrialRow


#: Trial statuses in the search's plots.
STATUS_COLORS = {"completed": "tab:blue", "stopped early": "tab:orange", "interrupted": "tab:purple",
                 "failed": "tab:red"}


def make_plots(run: RunDir, rows: list[TrialRow], results: dict[str, Any]) -> dict[str, str]:
    """Write `plots/*.png`; returns name -> why a plot could not be drawn (empty when all were)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run.plots.mkdir(exist_ok=True)
    chosen = results["search"]["best"]["trial_id"]
    scored = [r for r in rows if r.best_val_accuracy is not None]
    _pareto(plt, scored, chosen, results["run"]["budget"], run.plots / "pareto.png")
    if "latency" in results["plots"]:  # the student's shapes were timed: accuracy vs speed
        _latency_front(plt, scored, chosen, run.plots / "latency.png")
    skipped = _importances(plt, run, results["run"]["name"], results["run"]["seed"], len(scored))
    _curves(plt, rows, chosen, run.plots / "curves.png")
    _confusion(plt, results, run.plots / "confusion.png")
    _latency_size(plt, results, run.plots / "latency_size.png")
    return skipped


def _pareto(plt: Any, scored: list[TrialRow], chosen: str, budget: int, path: Path) -> None:
    fig, ax = _front(plt, scored, lambda r: r.config.trainable_params, chosen)
    ax.axvline(budget, c="red", ls="--", label=f"budget {budget:,}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_title("Search: accuracy vs trainable parameters")
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def _latency_front(plt: Any, scored: list[TrialRow], chosen: str, path: Path) -> None:
    fig, ax = _front(plt, [r for r in scored if r.latency_ms is not None], lambda r: r.latency_ms, chosen)
    ax.set_xlabel("batch-1 latency, ms (p50, measured before the search)")
    ax.set_title("Search: accuracy vs latency (each student shape)")
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def _importances(plt: Any, run: RunDir, study_name: str, seed: int, trained: int) -> dict[str, str]:
    """Parameter importances (fANOVA) on the trials that trained; {"importances": why} when
    they cannot be computed (a placeholder image says why)."""
    try:
        importances = param_importances(run, study_name, seed)
    except (ValueError, RuntimeError) as e:
        _placeholder(plt, run.plots / "importances.png", f"no importances: {e}")
        return {"importances": str(e)}
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(importances) + 1.5))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance for validation accuracy (fANOVA)")
    ax.set_title(f"Optuna parameter importances ({trained} trials)")
    _save(fig, run.plots / "importances.png")
    return {}


def _curves(plt: Any, rows: list[TrialRow], chosen: str, path: Path) -> None:
    """Validation accuracy per epoch of every trial."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        acc = r.val_accuracy_per_epoch
        if not acc:
            continue
        mine = r.trial_id == chosen
        ax.plot(range(1, len(acc) + 1), acc, marker="o", c="black" if mine else STATUS_COLORS.get(r.status, "gray"),
                lw=2.5 if mine else 1, alpha=0.8, zorder=4 if mine else 2)
        if r.status == "stopped early":
            ax.scatter([len(acc)], [acc[-1]], marker="x", s=80, c="black", zorder=5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation accuracy per epoch of every trial")
    ax.legend(handles=[Line2D([], [], c=STATUS_COLORS["completed"], marker="o", label="completed"),
                       Line2D([], [], c=STATUS_COLORS["stopped early"], marker="o", label="stopped early (x: ASHA)"),
                       Line2D([], [], c="black", lw=2.5, marker="o", label="chosen")], fontsize=8, loc="best")
    _save(fig, path)


def _confusion(plt: Any, results: dict[str, Any], path: Path) -> None:
    """Test confusion matrices of the teacher and the shipped student."""
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
    _save(fig, path)


def _latency_size(plt: Any, results: dict[str, Any], path: Path) -> None:
    """Batch-1 latency (p50, p95) and size of every benchmarked model."""
    bench = results["benchmark"]
    models = list(bench)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(models))
    a1.bar(x - 0.2, [bench[m]["latency_ms_p50"] for m in models], 0.4, label="p50")
    a1.bar(x + 0.2, [bench[m]["latency_ms_p95"] for m in models], 0.4, label="p95")
    a1.set_xticks(x, models, rotation=25, ha="right")
    a1.set_ylabel("ms per example (batch 1)")
    a1.set_title(f"latency on {results['final']['device_type']}")
    a1.legend()
    a2.bar(x, [bench[m]["size_mb"] for m in models], color="tab:green")
    a2.set_xticks(x, models, rotation=25, ha="right")
    a2.set_ylabel("MB (safetensors)")
    a2.set_title("size")
    _save(fig, path)


#: fANOVA fits a random forest to (knobs -> accuracy): below this many completed trials its
#: ranking of 8-10 knobs says more about the forest than about the knobs.
MIN_IMPORTANCE_TRIALS = 10


def _front(plt: Any, rows: list[TrialRow], x: Any, chosen: str) -> tuple[Any, Any]:
    """Validation accuracy of every scored trial against `x(row)` (lower is better), coloured by
    status, the Pareto front of the completed trials and the chosen trial as a star."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for status, color in STATUS_COLORS.items():
        pts = [r for r in rows if r.status == status]
        if pts:
            ax.scatter([x(r) for r in pts], [r.best_val_accuracy for r in pts], c=color, label=status, alpha=0.8)
    # The front joins trials that ran all their epochs: a trial ASHA stopped after one epoch is
    # plotted (orange) but is not comparable with full runs, so it never shapes the front.
    front, top = [], -1.0
    for r in sorted((r for r in rows if r.status == "completed"), key=lambda r: (x(r), -r.best_val_accuracy)):
        if r.best_val_accuracy > top:
            front.append(r)
            top = r.best_val_accuracy
    if front:
        ax.step([x(r) for r in front], [r.best_val_accuracy for r in front], where="post",
                c="gray", lw=1, label="Pareto front (completed trials)")
    star = next((r for r in rows if r.trial_id == chosen), None)
    if star is not None:
        ax.scatter([x(star)], [star.best_val_accuracy], marker="*", s=300, c="gold", edgecolors="black", zorder=5,
                   label="chosen")
    ax.set_ylabel("best validation accuracy")
    return fig, ax


def param_importances(run: RunDir, study_name: str, seed: int) -> dict[str, float]:
    """fANOVA importances over the trials that trained (over-budget rejections left out)."""
    import optuna

    from kdray.trials import REJECTED_ATTR

    study = optuna.load_study(study_name=study_name, storage=run.optuna_url)
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
