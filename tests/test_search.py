"""The search: budget-constrained Tune + Optuna + ASHA on 2 CPUs, wandb offline, kill and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pyarrow.parquet as pq
import yaml

from kdray import metrics as M
from kdray.config import load_config
from kdray.stages.searcher import BudgetedSpace
from kdray.trials import REJECTED_ATTR, TrialConfig
from tests.conftest import ROOT
from tests.wandb_log import run_config


SEARCHED = ["alpha", "temperature", "learning_rate", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "epochs"]


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdray.search", *args], capture_output=True, text=True, cwd=ROOT, **kw)


def test_budget_below_the_head_exits_2_before_ray(tmp_path):
    r = run_cli("--space", "smoke", "--budget", "50", "--output-dir", str(tmp_path))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "below the smallest feasible student of this space (" in r.stderr and "--budget" in r.stderr
    assert "Traceback" not in r.stderr and "Ray" not in r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_space_counts_every_sample_and_rejects_over_budget_ones():
    cfg = load_config("smoke")
    space = BudgetedSpace(cfg.space, cfg.student, 2, budget=1_500, n_layers=2)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    verdicts = []
    for _ in range(40):
        trial = study.ask()
        out = space(trial)
        choice = TrialConfig.from_params(trial.params)
        verdicts.append(out["feasible"])
        assert out["feasible"] == (bool(choice.lora.layers) and out[M.TRAINABLE_PARAMS] <= 1_500)
        assert bool(trial.user_attrs.get(REJECTED_ATTR)) == (not out["feasible"])
        study.tell(trial, 0.5 if out["feasible"] else 0.0)
    assert any(verdicts) and not all(verdicts)


def test_smoke_search_with_concurrency_two_on_two_cpus(ray_cluster, smoke_run):
    """6 trials, 2 at a time on the 2-CPU cluster (the `smoke_run` fixture); ASHA stops some."""
    assert ray_cluster.cluster_resources()["CPU"] == 2
    run = smoke_run
    rows = pq.read_table(run / "search" / "trials.parquet").to_pylist()
    assert len(rows) == 6
    budget = load_config("smoke").budget
    for row in rows:
        assert row["status"] in ("completed", "stopped early")
        assert row["reported_trainable_params"] == row[M.TRAINABLE_PARAMS] <= budget  # the worker's real model
        assert len(row["val_accuracy_per_epoch"]) == row["epochs_run"] >= 1
    assert any(r["status"] == "stopped early" for r in rows), rows
    best = yaml.safe_load((run / "best_config.yaml").read_text())
    assert best["best_val_accuracy"] == max(r["best_val_accuracy"] for r in rows)
    # The study reads as Optuna users expect: trials ASHA stopped are PRUNED (with their
    # per-epoch values), those that ran all epochs COMPLETE, rejected samples never COMPLETE,
    # and every trial carries its trainable-parameter count.
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{run / 'search' / 'optuna.db'}")
    State = optuna.trial.TrialState
    trained = [t for t in study.trials if not t.user_attrs.get(REJECTED_ATTR)]
    rejected = [t for t in study.trials if t.user_attrs.get(REJECTED_ATTR)]
    assert len(trained) == len(rows)
    assert sum(t.state == State.PRUNED for t in trained) == sum(r["status"] == "stopped early" for r in rows) >= 1
    assert sum(t.state == State.COMPLETE for t in trained) == sum(r["status"] == "completed" for r in rows)
    assert all(t.intermediate_values for t in trained if t.state == State.PRUNED)
    assert all(t.state == State.PRUNED and t.values is None for t in rejected)
    assert sorted(t.user_attrs[M.TRAINABLE_PARAMS] for t in trained) == sorted(r[M.TRAINABLE_PARAMS] for r in rows)
    assert all(t.user_attrs[M.TRAINABLE_PARAMS] > budget or not t.params.get("layer_0", True) or
               not t.params.get("layer_1", True) for t in rejected)

    # wandb offline: one run directory per trial (plus the final stage's), the searched knobs and
    # trainable_params in its config.
    final_id = json.loads((run / "results.json").read_text())["wandb"]["run_id"]
    runs = sorted(d for d in (run / "wandb").glob("offline-run-*") if not d.name.endswith(final_id))
    assert len(runs) == 6
    by_trial = {row["trial_id"]: row for row in rows}
    for d in runs:
        values = run_config(d)
        for knob in SEARCHED + [M.TRAINABLE_PARAMS, "layers"]:  # the trial's TrialConfig, as a trials.parquet row
            assert knob in values, (d, knob)
        row = by_trial[d.name.rsplit("-", 1)[1]]  # offline-run-<time>-<trial id>
        assert values[M.TRAINABLE_PARAMS] == row[M.TRAINABLE_PARAMS] and values["alpha"] == row["alpha"]


def test_console_is_kdrays_progress_only(smoke_console):
    """Without --verbose a whole run (teacher, 6 trials, final stage, report) prints kdray's own
    lines: no traceback, none of Ray's, Tune's or the trial processes' chatter. One row per trial
    epoch (how many depends on what ASHA stops) plus one per ended trial, and ~40 other lines."""
    run, console = smoke_console
    lines = console.splitlines()
    rows = [line for line in lines if re.match(r"([0-9a-f]{8}|(student|no_kd|head_only)/s\d+) ", line)]
    assert len(rows) <= (6 + 2) * (3 + 1), console  # 6 search + 2 final trials, 3 epochs + an end row each
    assert len(lines) - len(rows) <= 40, console
    for noise in ("Traceback", "core_worker", "(run_trial pid", "Configuration for experiment", " INFO ",
                  "WARNING", "tensorboard", "it/s]", "examples/s]"):
        assert noise not in console, (noise, console)
    done = [line for line in lines if line.startswith("-- ") and "trials done" in line]
    assert done and "best val acc" in done[-1]
    # The search's last progress line names the trial the search chose (ties: fewer parameters).
    chosen = yaml.safe_load((run / "best_config.yaml").read_text())["trial_id"]
    assert f"({chosen});" in [line for line in done if "6/6 trials done" in line][-1]
    assert any("to go" in line for line in done)
    assert "wandb sync" in console and "report:" in console


def test_kill_after_first_completed_trial_then_resume_and_finish(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    args = ["--space", "smoke", "--trials", "3", "--output-dir", str(tmp_path), "--wandb", "disabled", "--no-final",
            "--address", address, "--set", "search.concurrency=1", "--set", "space.epochs=[2]"]
    proc = subprocess.Popen([sys.executable, "-m", "kdray.search", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.rstrip().endswith("completed") or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(l.rstrip().endswith("completed") for l in lines), "".join(lines[-30:])
    done_before = {l.split()[0] for l in lines if l.rstrip().endswith("completed")}

    # The resumed search goes on into the final stage (no baselines, one seed: the chosen trial itself).
    resumed = [a for a in args if a != "--no-final"] + ["--set", "final.baselines=false", "--resume"]
    r = run_cli(*resumed, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "smoke" / "final" / "student" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "smoke" / "results.json").read_text())["search"]["trials"] == 3
    rows = pq.read_table(tmp_path / "smoke" / "search" / "trials.parquet").to_pylist()
    assert len(rows) == 3
    assert len({r["trial_id"] for r in rows}) == 3
    for trial_id in done_before:
        assert [r["status"] for r in rows if r["trial_id"] == trial_id] == ["completed"]
        # Not trained again: each epoch trained once, one checkpoint per epoch. (Tune writes its
        # experiment snapshot to the storage path asynchronously, so a trial that finished an
        # instant before the kill can be restored: it finds its last epoch done and ends at
        # once, and Tune repeats that last result as the trial's final one.)
        (trial_dir,) = [p for p in (tmp_path / "smoke" / "search").iterdir() if f"_{trial_id}_" in p.name]
        results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        trained = {(r["epoch"], r[M.TRAIN_LOSS]) for r in results}
        assert sorted(trained) == sorted({(r["epoch"], r[M.TRAIN_LOSS]) for r in results[:2]}) and len(trained) == 2
        assert len([p for p in trial_dir.glob("checkpoint_*") if p.is_dir()]) == 2


def test_rejected_samples_do_not_use_up_tpes_random_start_up():
    """Rejected samples are told as PRUNED, which TPE counts toward its start-up. After ten
    rejections and one trained trial, with a start-up of three trained trials, kdray's sampler
    still samples at random (exactly what Optuna's RandomSampler with the same seed draws);
    plain TPE has left its start-up and is already guided by the rejections."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from kdray.stages.searcher import TrainedStartupTPESampler
    from kdray.trials import REJECTED_ATTR

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {"shape": CategoricalDistribution(["0,3", "0,2,4", "0,1,3,5"]), "lr": FloatDistribution(1e-4, 1e-2, log=True)}

    def draws(sampler, n=3):
        study = optuna.create_study(sampler=sampler, direction="maximize")
        for i in range(10):
            study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, distributions=dists,
                                                      params={"shape": "0,1,3,5", "lr": 1e-3 * (1 + i / 10)},
                                                      user_attrs={REJECTED_ATTR: True}))
        study.add_trial(optuna.trial.create_trial(value=0.7, distributions=dists, params={"shape": "0,3", "lr": 2e-3}))
        out = []
        for _ in range(n):
            trial = study.ask(dists)
            out.append((trial.params["shape"], round(trial.params["lr"], 8)))
            study.tell(trial, 0.5)
        return out

    random = draws(optuna.samplers.RandomSampler(seed=0))
    ours = draws(TrainedStartupTPESampler(seed=0, n_startup_trials=3))
    plain = draws(optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    assert ours[:2] == random[:2]  # two more trained trials before TPE takes over
    assert plain[:2] != random[:2]
