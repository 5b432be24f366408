"""The benchmarks run and write what they print (numbers are checked for sense, never for speed)."""

from __future__ import annotations

import json

from bench.bench import main


def test_overhead_of_the_smoke_search(smoke_run, tmp_path):
    assert main(["--output-dir", str(tmp_path), "overhead", "--run", str(smoke_run)]) == 0
    r = json.loads((tmp_path / "overhead-smoke.json").read_text())
    assert r["settings"]["trials"] == 6 and r["epochs"] >= 6
    # A trial's wall time covers its training loop and Ray's start-up around it.
    assert all(f > 0 for f in r["fixed_cost_s_per_trial"])
    assert 0 < r["fixed_share_of_trial_time"] < 1 and 0 < r["busy_share_of_search_wall"] <= 1


def test_infer_on_the_smoke_models(tmp_path):
    assert main(["--output-dir", str(tmp_path), "infer", "--space", "smoke", "--runs", "5", "--warmup", "1",
                 "--device", "cpu"]) == 0
    r = json.loads((tmp_path / "infer-cpu.json").read_text())
    assert list(r["models"]) == ["teacher", "student", "student_unmerged", "plain", "student_int8"]
    assert r["models"]["student"]["total_params"] == r["models"]["plain"]["total_params"]
    assert r["models"]["student_unmerged"]["total_params"] > r["models"]["student"]["total_params"]
    assert 0.0 <= r["int8_prediction_agreement"] <= 1.0
    assert all(b["latency_ms_p50"] > 0 and b["throughput_per_s"] > 0 for b in r["models"].values())


def test_eval_passes_of_the_smoke_models_at_two_batch_sizes(tmp_path):
    assert main(["--output-dir", str(tmp_path), "eval", "--space", "smoke", "--batch-sizes", "8", "64",
                 "--rounds", "1", "--device", "cpu"]) == 0
    r = json.loads((tmp_path / "eval-cpu.json").read_text())
    for role in ("student", "teacher"):
        assert r[role]["examples"] == 256 and r[role]["threads"] == 1  # smoke: one CPU for trials and teacher
        assert set(r[role]["seconds_median"]) == {"8", "64"} and all(t > 0 for t in r[role]["seconds_median"].values())


def test_the_performance_table_is_the_committed_json():
    from bench.bench import PERFORMANCE_DOC, TABLE_END, TABLE_START, performance_table
    from tests.conftest import ROOT

    text = PERFORMANCE_DOC.read_text()
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == performance_table(ROOT / "bench" / "results"), "run `python bench/bench.py table`"
    assert table.count("\n") >= 4  # header, rule and measured rows


def test_search_benchmark_runs_both_systems_on_the_smoke_space(ray_cluster, tmp_path):
    assert main(["--output-dir", str(tmp_path), "search", "--space", "smoke", "--trials", "2", "--epochs", "1"]) == 0
    r = json.loads((tmp_path / "search-cpu.json").read_text())
    for side in ("peer", "kdray"):
        assert r[side]["trial_epochs"] == 2 and r[side]["wall_s"] > 0 and r[side]["curve"]
    assert r["trial_epochs_per_hour_ratio"] == \
        r["kdray"]["trial_epochs_per_hour"] / r["peer"]["trial_epochs_per_hour"]
    assert (tmp_path / "search-cpu.png").read_bytes()[:4] == b"\x89PNG"
