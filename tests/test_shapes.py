"""The student's shape as a search dimension: candidates, their measured latency, the latency budget."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

from kdray import metrics as M
from kdray.config import load_config
from kdray.errors import UserError
from kdray.stages.searcher import BudgetedOptunaSearch, BudgetedSpace
from kdray.trials import REJECTED_ATTR, REJECTED_WHY_ATTR, SHAPE_PARAM, TrialConfig


SHAPES = ["space.keep_layers=[[0],[0,1]]", "space.layers=all", "final.latency_runs=5", "final.warmup_runs=1"]


def test_shape_problems_are_reported_with_their_field():
    with pytest.raises(UserError) as e:
        load_config("smoke", ["space.keep_layers=[[0],[1,1],[]]"])
    text = "\n".join(e.value.problems)
    assert "space.keep_layers: [1, 1] must list at least one layer, each once" in text
    assert "space.keep_layers: [] must list" in text
    assert "space.layers: subset picks LoRA layers by position" in text  # smoke searches layer subsets
    from kdray.sources import check_models

    with pytest.raises(UserError) as e:
        check_models(load_config("smoke", ["space.keep_layers=[[0],[0,5]]", "space.layers=all"]))
    assert "space.keep_layers: [0, 5] has layers out of range: the model has 2 layers" in e.value.message()


def test_a_sampled_shape_trains_that_shape_and_survives_every_conversion():
    cfg = load_config("smoke", SHAPES)
    space = BudgetedSpace(cfg.space, cfg.student, 2, budget=10**6, n_layers=2)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        out = space(trial)
        c = TrialConfig.from_params(trial.params, out[M.TRAINABLE_PARAMS])
        seen.add(trial.params[SHAPE_PARAM])
        assert c.keep_layers == [int(x) for x in trial.params[SHAPE_PARAM].split(",")]
        assert c.student(cfg.student).keep_layers == c.keep_layers
        assert TrialConfig.from_row(c.to_row()) == c
        assert TrialConfig.from_yaml({**c.to_yaml(), M.TRAINABLE_PARAMS: c.trainable_params}) == c
        study.tell(trial, 0.5)
    assert seen == {"0", "0,1"}
    one, two = (TrialConfig.from_params({**trial.params, SHAPE_PARAM: s}) for s in ("0", "0,1"))
    from kdray.train.budget import count

    # The count follows the shape: one layer has half the LoRA parameters of two.
    assert count(one.student(cfg.student), 2) < count(two.student(cfg.student), 2)


def test_latency_budget_rejects_a_too_slow_shape_before_it_trains_and_optuna_is_told():
    cfg = load_config("smoke", SHAPES)
    space = BudgetedSpace(cfg.space, cfg.student, 2, budget=10**6, n_layers=2,
                          latency={"0": 1.0, "0,1": 3.0}, limit_ms=2.0)
    searcher = BudgetedOptunaSearch(space=space, metric=M.VAL_ACCURACY, mode="max",
                                    sampler=optuna.samplers.RandomSampler(seed=0))
    handed = [searcher.suggest(f"t{i}") for i in range(8)]
    # Tune only ever receives the fast shape; each config carries its latency.
    assert all(c[SHAPE_PARAM] == "0" and c[M.LATENCY_MS] == 1.0 and c["feasible"] for c in handed)
    trials = searcher._ot_study.get_trials(deepcopy=False)
    slow = [t for t in trials if t.params[SHAPE_PARAM] == "0,1"]
    assert slow, "the random sampler never drew the slow shape: the test proves nothing"
    for t in slow:  # told at once, as infeasible, with why and by how much
        assert t.state == optuna.trial.TrialState.PRUNED
        assert t.user_attrs[REJECTED_ATTR] and t.user_attrs[REJECTED_WHY_ATTR] == "latency"
        assert t.user_attrs[M.LATENCY_MS] == 3.0 and t.system_attrs["constraints:latency"] == pytest.approx(1.0)
    assert all(t.state == optuna.trial.TrialState.RUNNING for t in trials if t.params[SHAPE_PARAM] == "0")


def test_measure_times_each_shape_caches_it_and_refuses_a_budget_no_shape_meets(ray_cluster):
    from kdray.data.load import load_data
    from kdray.stages.shapes import measure

    cfg = load_config("smoke", SHAPES)
    task = load_data(cfg.data)
    table = measure(cfg, task)
    assert [s.keep_layers for s in table.shapes] == [[0], [0, 1]] and not table.cached
    assert table.runtime == cfg.serve.runtime == "onnx-int8"  # timed in the form the student is served in
    # In another runtime they are other numbers (another cache entry, timed again).
    eager = measure(dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, runtime="pytorch")), task)
    assert eager.runtime == "pytorch" and not eager.cached and eager.latency_of() != table.latency_of()
    assert all(s.latency_ms > 0 and s.fits for s in table.shapes) and table.teacher_ms > 0
    (lo1, hi1), (lo2, hi2) = (s.params for s in table.shapes)
    assert lo1 < hi1 and lo2 < hi2 and hi1 < hi2  # a second layer adds LoRA parameters
    again = measure(cfg, task)
    assert again.cached and again.latency_of() == table.latency_of()
    # The budget is applied to the cached measurement: no re-timing needed to change it.
    slowest = max(s.latency_ms for s in table.shapes)
    tight = measure(dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, latency_budget_ms=slowest * 0.999)), task)
    assert tight.cached and not all(s.fits for s in tight.shapes) and tight.limit_ms == pytest.approx(slowest * 0.999)
    for change, field in (({"latency_budget_ms": 1e-9}, "search.latency_budget_ms"), ({"min_speedup": 1e6}, "search.min_speedup")):
        with pytest.raises(UserError) as e:
            measure(dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, **change)), task)
        assert e.value.message().startswith(f"{field}: no student shape is fast enough") or field in e.value.message()
        assert "Fix: a looser --latency-budget" in e.value.message()


def test_a_shape_search_under_a_latency_budget_never_trains_the_slow_shape(ray_cluster, tmp_path):
    """End to end, as a user runs it: `kdray search --latency-budget MS` over two shapes, final stage and report. The
    latencies are measured first (and cached, so the search reads the very same numbers) and the
    budget falls between them: the slower shape is rejected before any trial, Optuna is told."""
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from kdray.data.load import load_data
    from kdray.stages.shapes import measure
    from tests.conftest import ROOT

    cfg = load_config("smoke", SHAPES)
    table = measure(cfg, load_data(cfg.data))
    fast, slow = sorted(table.shapes, key=lambda s: s.latency_ms)
    limit = (fast.latency_ms + slow.latency_ms) / 2
    overrides = [a for o in SHAPES for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "kdray", "search", "--space", "smoke", *overrides, "--trials", "6",
                        "--set", "space.epochs=[1]", "--set", "final.baselines=false",
                        "--latency-budget", f"{limit:.9f}", "--wandb", "disabled", "--output-dir", str(tmp_path),
                        "--address", ray_cluster.get_runtime_context().gcs_address],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "student shapes: batch-1 p50 in onnx-int8 (serve.runtime)" in r.stdout and "(cached)" in r.stdout
    assert "too slow: never trains" in r.stdout
    assert f" all of {fast.text} " in r.stdout  # each trial's progress line names its shape
    rows = pq.read_table(tmp_path / "smoke" / "search" / "trials.parquet").to_pylist()
    assert len(rows) == 6
    assert {row[SHAPE_PARAM] for row in rows} == {fast.text}
    assert all(row[M.LATENCY_MS] == pytest.approx(fast.latency_ms) for row in rows)
    assert {row["latency_runtime"] for row in rows} == {"onnx-int8"}  # the shapes' latencies came from ONNX Runtime
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'smoke' / 'search' / 'optuna.db'}")
    rejected = [t for t in study.get_trials() if t.user_attrs.get(REJECTED_WHY_ATTR) == "latency"]
    assert rejected, "no sample of the slow shape was drawn: raise search.trials"
    assert all(t.params[SHAPE_PARAM] == slow.text and t.state == optuna.trial.TrialState.PRUNED for t in rejected)
    import yaml

    best = yaml.safe_load((tmp_path / "smoke" / "best_config.yaml").read_text())
    assert best["student"]["keep_layers"] == fast.keep_layers  # the final stage retrains this shape
    run = tmp_path / "smoke"
    import json

    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(run / "final" / "student").num_hidden_layers == len(fast.keep_layers)
    results = json.loads((run / "results.json").read_text())
    assert results["plots"]["latency"] == "plots/latency.png" and (run / "plots" / "latency.png").stat().st_size > 5_000
    report = (run / "report.md").read_text()
    assert f"student shape: layers {fast.text} of the model" in report and "| ms (batch 1, onnx-int8) |" in report
