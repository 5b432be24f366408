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
import pytest
import pyarrow.parquet as pq
import yaml

from kdray import metrics as M
from kdray.config import load_config
from kdray.stages.searcher import BudgetedSpace
from kdray.trials import REJECTED_ATTR, TrialConfig
from tests.conftest import ROOT, SMOKE_BUDGET
from tests.wandb_log import run_config


SEARCHED = ["alpha", "temperature", "learning_rate", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
            "lora_variant", "epochs"]


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
    budget = SMOKE_BUDGET
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
    # The budget rejected samples (no over-budget configuration trained: every row is within it).
    assert any(t.user_attrs[M.TRAINABLE_PARAMS] > budget for t in rejected), [t.user_attrs for t in rejected]
    # The LoRA variant is a searched knob: sampled from the smoke space's three, trained as sampled
    # (the worker's count, DoRA's magnitudes included, matched the sample's above), and shown.
    assert study.trials[0].distributions["lora_variant"].choices == ("lora", "rslora", "dora")
    assert sorted(r["lora_variant"] for r in rows) == sorted(t.params["lora_variant"] for t in trained)
    assert len({t.params["lora_variant"] for t in study.trials}) > 1
    chosen = next(r for r in rows if r["trial_id"] == best["trial_id"])
    assert best["student"]["lora"]["variant"] == chosen["lora_variant"]
    report = (run / "report.md").read_text()
    assert f"LoRA ({chosen['lora_variant']}) r {chosen['lora_r']}" in report and "| LoRA | r |" in report

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
    epoch (how many depends on what ASHA stops) plus one per ended trial, and ~50 other lines."""
    run, console = smoke_console
    lines = console.splitlines()
    rows = [line for line in lines if re.match(r"([0-9a-f]{8}|(student|no_kd|head_only)/s\d+) ", line)]
    assert len(rows) <= (6 + 2) * (3 + 1), console  # 6 search + 2 final trials, 3 epochs + an end row each
    assert len(lines) - len(rows) <= 50, console  # ~40, and the served forms' 9 lines
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
    resumed = [a for a in args if a != "--no-final"] + ["--set", "final.baselines=false", "--set", "serve.export=false",
                                                        "--set", "serve.runtime=pytorch",
                                                        "--resume"]
    r = run_cli(*resumed, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "smoke" / "final" / "student" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "smoke" / "results.json").read_text())["search"]["trials"] == 3
    rows = pq.read_table(tmp_path / "smoke" / "search" / "trials.parquet").to_pylist()
    assert len(rows) == 3
    assert len({r["trial_id"] for r in rows}) == 3
    for trial_id in done_before:
        assert [r["status"] for r in rows if r["trial_id"] == trial_id] == ["completed"]
        # Not trained again: each epoch trained once, one checkpoint per epoch. A retrain from
        # scratch would report the same losses (training is deterministic) but write new
        # checkpoints (checkpoint_000002, ...; Tune keeps the last 2), so the trial's directory
        # must hold exactly the two it wrote before the kill. (Tune writes its experiment snapshot
        # asynchronously, so a trial that finished an instant before the kill can be restored: it
        # finds its last epoch done and ends at once, and Tune repeats that last result as the
        # trial's final one, in a `result.json` it starts afresh.)
        assert checkpoints(tmp_path / "smoke", trial_id) == ["checkpoint_000000", "checkpoint_000001"]
        results = epochs_and_checkpoints(tmp_path / "smoke", trial_id)
        assert (2, "checkpoint_000001") in results
        assert results <= {(1, "checkpoint_000000"), (2, "checkpoint_000001")}, results


def trial_dir(run, trial_id: str):
    (path,) = [p for p in (run / "search").iterdir() if f"_{trial_id}_" in p.name]
    return path


def trial_results(run, trial_id: str) -> list[dict]:
    """Every result line Tune wrote for a trial (its `result.json`, appended across restores)."""
    return [json.loads(line) for line in (trial_dir(run, trial_id) / "result.json").read_text().splitlines()]


def checkpoints(run, trial_id: str) -> list[str]:
    """The epoch checkpoints on disk in a trial's directory."""
    return sorted(p.name for p in trial_dir(run, trial_id).glob("checkpoint_*"))


def epochs_and_checkpoints(run, trial_id: str) -> set[tuple[int, str]]:
    return {(r["epoch"], r["checkpoint_dir_name"]) for r in trial_results(run, trial_id)}


def test_ctrl_c_mid_search_stops_the_command_and_resume_finishes_the_interrupted_trials(ray_cluster, tmp_path):
    """SIGINT while trials train: Tune stops and snapshots, the running trials are `interrupted`
    (not `stopped early`), no final stage starts, the console says how to continue, exit 130.
    `--resume` then finishes them, each from its last epoch checkpoint: no epoch trains twice."""
    epochs = 6
    args = ["--space", "smoke", "--trials", "2", "--output-dir", str(tmp_path), "--wandb", "disabled",
            "--address", ray_cluster.get_runtime_context().gcs_address, "--set", "search.concurrency=2",
            "--set", f"space.epochs=[{epochs}]", "--set", f"search.grace_period={epochs}"]
    proc = subprocess.Popen([sys.executable, "-m", "kdray.search", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, reached = [], {}
    for line in proc.stdout:
        lines.append(line)
        m = re.match(r"^(\w{8})\s.*\s(\d+)\s+\S+\s+running$", line)
        if m:
            reached[m.group(1)] = int(m.group(2))
        if len(reached) == 2 and min(reached.values()) >= 2:
            break
    proc.send_signal(signal.SIGINT)
    console = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, console[-3000:]
    assert "search interrupted" in console and "--resume" in console, console[-3000:]
    run = tmp_path / "smoke"
    rows = pq.read_table(run / "search" / "trials.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"interrupted"}, rows
    assert not (run / "final").exists() and not (run / "report.md").exists()  # no final stage started
    before = {r["trial_id"]: r["epochs_run"] for r in rows}
    assert all(1 <= e < epochs for e in before.values()), before

    r = run_cli(*args, "--resume", "--no-final", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = pq.read_table(run / "search" / "trials.parquet").to_pylist()
    assert {r["trial_id"]: r["status"] for r in rows} == {t: "completed" for t in before}
    for trial_id in before:
        # Continued, not retrained: each epoch has the one checkpoint it wrote. (A restored trial may
        # repeat its last result, checkpoint and all; a retrain would write checkpoint_000006 on.)
        assert epochs_and_checkpoints(run, trial_id) == {(e, f"checkpoint_{e - 1:06d}") for e in range(1, epochs + 1)}


def test_a_budget_only_one_layer_students_meet_trains_one_layer_students(ray_cluster, tmp_path):
    """The smoke space picks layer subsets, so its floor is a one-layer student (1,378 at r=2 on
    q, v): a budget of 1,400 trains exactly such students."""
    r = run_cli("--space", "smoke", "--budget", "1400", "--trials", "2", "--no-final", "--output-dir", str(tmp_path),
                "--wandb", "disabled", "--address", ray_cluster.get_runtime_context().gcs_address,
                "--set", "space.epochs=[1]", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = pq.read_table(tmp_path / "smoke" / "search" / "trials.parquet").to_pylist()
    assert len(rows) == 2
    assert all(len(row["layers"].split(",")) == 1 and row[M.TRAINABLE_PARAMS] <= 1400 for row in rows), rows


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


def test_run_names_resume_and_overwrite(tmp_path, capsys):
    """A run without --name takes the space's name, then the next free `<name>-2`, `<name>-3`;
    a --name that exists needs --resume (with a search to resume) or --overwrite, which deletes
    the earlier run only once every input has been checked (`kdray.stages.pipeline`)."""
    import argparse

    from kdray.artifacts import RunDir
    from kdray.cli.search import choose_run
    from kdray.data.load import load_data
    from kdray.errors import UserError
    from kdray.stages import pipeline

    def args(**kw):
        return argparse.Namespace(**{"output_dir": str(tmp_path), "name": None, "resume": False, "overwrite": False,
                                     **kw})

    first = choose_run(args(), load_config("smoke"))
    assert first.root == tmp_path / "smoke"
    (tmp_path / "smoke" / "search").mkdir(parents=True)
    cfg = load_config("smoke")
    assert choose_run(args(), cfg).root == tmp_path / "smoke-2" and cfg.name == "smoke-2"
    assert "run name: smoke-2" in capsys.readouterr().out
    (tmp_path / "smoke-2").mkdir()
    assert choose_run(args(), load_config("smoke")).root == tmp_path / "smoke-3"
    with pytest.raises(UserError, match="already holds a run. Fix: --resume to continue it, --overwrite"):
        choose_run(args(name="smoke"), load_config("smoke"))
    with pytest.raises(UserError, match="--resume: no search to resume"):
        choose_run(args(name="smoke", resume=True), load_config("smoke"))
    (tmp_path / "smoke" / "search" / "optuna.db").write_text("")
    assert choose_run(args(name="smoke", resume=True), load_config("smoke")).root == tmp_path / "smoke"
    assert choose_run(args(name="smoke", overwrite=True), load_config("smoke")).root == tmp_path / "smoke"
    # --overwrite deletes the earlier run once the data and the budget have passed their checks.
    cfg = load_config("smoke")
    pipeline._before_ray(cfg, load_data(cfg.data), RunDir(tmp_path / "smoke"), pipeline.Options(overwrite=True))
    assert not (tmp_path / "smoke").exists() and (tmp_path / "smoke-2").exists()
