"""The final stage and report on the smoke run: files, schema, pipeline, merge equivalence,
baselines; error-analysis buckets by hand; `kdray.cli.predict` and `kdray.stages.final` on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import torch
import yaml

from kdray import metrics as M
from kdray.evaluate.error_analysis import error_analysis
from kdray.report.results import PLOTS, SCHEMA_PATH
from tests.conftest import ROOT
from tests.wandb_log import run_config


def cli(command: str, *args: str, **kw) -> subprocess.CompletedProcess:
    """`python -m kdray COMMAND ARGS` in its own process."""
    return subprocess.run([sys.executable, "-m", "kdray", command, *args], capture_output=True, text=True, cwd=ROOT, **kw)


def test_final_stage_writes_every_file_and_a_valid_results_json(smoke_run):
    run = smoke_run
    student = run / "final" / "student"
    for rel in ("config.json", "model.safetensors", "tokenizer.json", "kdray.json"):
        assert (student / rel).is_file(), rel
    assert (run / "final" / "adapter" / "adapter_config.json").is_file()
    for rel in ("final/final.json", "final/predictions.parquet", "results.json", "report.md"):
        assert (run / rel).is_file(), rel
    results = json.loads((run / "results.json").read_text())
    jsonschema.validate(results, json.loads(SCHEMA_PATH.read_text()))
    for name in PLOTS:
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000, name
    # Importances need trials that differ; a placeholder image says why when they do not.
    assert set(results["plots_skipped"]) <= {"importances"}

    report = (run / "report.md").read_text()
    for name in PLOTS:
        if name in results["plots_skipped"]:  # the report says why instead of showing a placeholder
            assert f"not computed ({results['plots_skipped'][name]})" in report
        else:
            assert f"](plots/{name}.png)" in report
    # 6 trials are too few for fANOVA to rank 10 knobs: the report says so rather than draw noise.
    assert "importances need at least 10" in results["plots_skipped"].get("importances", "")
    assert "| teacher |" in report and "| head_only |" in report and "## Error analysis" in report

    # The final wandb run is in the search's group and holds the comparison table and the plots.
    (final_run,) = (run / "wandb").glob(f"offline-run-*-{results['wandb']['run_id']}")
    assert run_config(final_run)["budget"] == results["run"]["budget"]
    logged = b"".join(p.read_bytes() for p in final_run.glob("files/media/**/*") if p.is_file())
    assert logged.count(b"\x89PNG") == len(PLOTS)
    (table,) = final_run.glob("files/media/table/comparison*.table.json")
    table = json.loads(table.read_text())
    assert [row[table["columns"].index("model")] for row in table["data"]] == list(results["benchmark"])


def test_the_saved_student_loads_in_a_pipeline_and_equals_the_unmerged_one(smoke_run):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, pipeline

    from kdray.config import load_config
    from kdray.data.load import load_data
    from kdray.data.tokenize import tokenize
    from kdray.train.batches import Split
    from kdray.train.loop import predict_logits
    from kdray.stages.teacher import prepare_teacher
    from kdray.train.models import build_model, from_pretrained_dir, load_tokenizer, to_payload

    run = smoke_run
    results = json.loads((run / "results.json").read_text())
    labels = results["run"]["data"]["label_names"]
    classify = pipeline("text-classification", model=str(run / "final" / "student"))
    out = classify(["a gripping, funny and moving film", "a dull mess"])
    assert [o["label"] in labels for o in out] == [True, True] and all(0.0 <= o["score"] <= 1.0 for o in out)

    # Merged (the saved student) vs unmerged (the base student + the saved PEFT adapter), on test.
    cfg = load_config(run / "config.yaml")
    task = load_data(cfg.data)
    test_split = task.read_test("tests")
    test = Split.from_dataset(tokenize(task, load_tokenizer(cfg.student), cfg.data.max_length, test=test_split)[0]["test"])
    seed = results["variants"]["student"]["chosen_seed"]
    start = None  # the weights the student started from: the fine-tuned teacher's (the smoke's student.init)
    if cfg.student.init == "teacher":
        start = to_payload(from_pretrained_dir(prepare_teacher(cfg, task).model_dir))  # cached: no training
    base = build_model(cfg.student, task.num_labels, task.label_names, seed=seed, base=start)
    unmerged = PeftModel.from_pretrained(base, run / "final" / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(run / "final" / "student", dtype=torch.float32)
    pad = load_tokenizer(cfg.student).pad_token_id
    # fp32, as the final stage scores and benchmarks on a CPU (kdray.train.precision.serving_precision)
    a = predict_logits(merged, test, 64, pad, torch.device("cpu"), precision="fp32")
    b = predict_logits(unmerged, test, 64, pad, torch.device("cpu"), precision="fp32")
    assert a.shape == (len(test_split), 2)
    assert np.abs(a - b).max() < 1e-4
    assert results["comparison"]["merge_max_abs_logit_diff"] < 1e-4
    # The shipped student's test accuracy is what the report says for its seed.
    shipped = next(r for r in results["variants"]["student"]["runs"] if r["seed"] == seed)
    assert shipped[M.TEST_ACCURACY] == pytest.approx(float((a.argmax(-1) == test.labels).mean()))


def test_selection_never_reads_the_test_split(smoke_run):
    """The test split is sealed in `TaskData` (read only through `read_test`, which records the
    reader): when the search ended nothing had opened it, the final stage opened it once, and what
    the trials trained and selected on (the teacher's cached logits) holds no test example."""
    from kdray.config import load_config
    from kdray.data.load import SELECTION_SPLITS, load_data
    from kdray.stages.teacher import prepare_teacher
    from kdray.train.logits import TeacherLogits

    run = smoke_run
    assert json.loads((run / "search" / "summary.json").read_text())["test_reads"] == []
    final = json.loads((run / "final" / "final.json").read_text())
    assert final["data"]["test_reads"] == ["final"]
    assert "nothing had opened the test split when the search ended" in (run / "report.md").read_text()

    cfg = load_config(run / "config.yaml")
    task = load_data(cfg.data)
    assert list(task.splits) == list(SELECTION_SPLITS) and task.test_reads == []
    teacher = prepare_teacher(cfg, task, log=False)
    assert teacher.cache_hit  # the run's own teacher, not a new one
    logits = TeacherLogits.from_parquet(teacher.logits_path)
    test_ids = set(task.read_test("tests")["example_id"])
    selection_ids = {i for s in SELECTION_SPLITS for i in task.splits[s]["example_id"]}
    assert set(logits.example_ids.tolist()) == selection_ids and not selection_ids & test_ids


def test_baselines_train_without_kd_and_with_a_frozen_encoder(smoke_run):
    from kdray.config import load_config
    from kdray.train.budget import head_cost

    run = smoke_run
    results = json.loads((run / "results.json").read_text())
    best = yaml.safe_load((run / "best_config.yaml").read_text())
    cfg = load_config(run / "config.yaml")
    v = results["variants"]
    assert set(v) == {"student", "no_kd", "head_only"}
    assert v["student"][M.TRAINABLE_PARAMS] == v["no_kd"][M.TRAINABLE_PARAMS] == best[M.TRAINABLE_PARAMS]
    assert v["head_only"][M.TRAINABLE_PARAMS] == head_cost(cfg.student, 2)
    # What the trials actually trained: alpha 1 for no_kd (its KD term is exactly 0), the best
    # alpha for the others.
    trials = list((run / "final" / "tune").glob("run_trial_*"))
    assert trials
    for trial in trials:
        case = json.loads((trial / "params.json").read_text())["trial"]
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert len(rows) == case["epochs"]
        assert rows[-1][M.TRAINABLE_PARAMS] == case[M.TRAINABLE_PARAMS]
        if case["variant"] == "no_kd":
            assert case["alpha"] == 1.0 and all(r[M.TRAIN_KD] == 0.0 for r in rows)
        else:
            assert case["alpha"] == best["train"]["alpha"] and all(r[M.TRAIN_KD] > 0.0 for r in rows)
    b = results["benchmark"]
    assert b["head_only"]["total_params"] == b["student"]["total_params"]  # same plain architecture once merged
    assert b["student_unmerged"]["total_params"] > b["student"]["total_params"]  # LoRA factors and a head copy


def test_rerunning_the_final_stage_alone(smoke_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdray.cli.main import main

    run = tmp_path / "smoke"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("wandb"))
    before = json.loads((run / "results.json").read_text())
    rows = pq.read_table(run / "search" / "trials.parquet").to_pylist()
    best = next(r for r in rows if r["trial_id"] == before["search"]["best"]["trial_id"])
    # The first run took the chosen search trial as the student's seed-0 run ...
    assert before["final"]["reused_search_trial"] == best["trial_id"] and best["status"] == "completed"
    # ... this one cannot (no checkpoint recorded), so it retrains every seed.
    pq.write_table(pa.Table.from_pylist([{**r, "checkpoint_path": None} for r in rows]), run / "search" / "trials.parquet")
    (run / "final" / "student" / "model.safetensors").unlink()
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["serve"].update(export=False, runtime="pytorch")  # the served forms have their own tests (test_serve)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["final", "--run", str(run), "--wandb", "disabled", "--seeds", "2"]) == 0
    after = json.loads((run / "results.json").read_text())
    assert after["final"]["reused_search_trial"] is None
    assert (run / "final" / "student" / "model.safetensors").is_file()
    assert after["wandb"] == {"mode": "disabled", "run_id": None}
    assert after["search"]["best"] == before["search"]["best"]
    # Same seeds, same data, same config: the retrained models come out the same (their training
    # losses, which differ in every digit between any two other runs, and not just a tiny model's
    # chance-level accuracy), and the retrained seed-0 student is the search trial the first run reused.
    assert after["variants"]["student"]["runs"][0]["train_loss_per_epoch"] == pytest.approx(
        best["train_loss_per_epoch"], rel=1e-6)
    seeds = [r["seed"] for r in after["variants"]["student"]["runs"]]
    losses = [r["train_loss_per_epoch"][-1] for r in after["variants"]["student"]["runs"]]
    assert len(set(seeds)) == len(seeds) > 1 and len(set(losses)) == len(losses)  # other seeds: other losses
    for variant, v in before["variants"].items():
        for old, new in zip(v["runs"], after["variants"][variant]["runs"]):
            assert new["seed"] == old["seed"]
            assert new["train_loss_per_epoch"] == pytest.approx(old["train_loss_per_epoch"], rel=1e-6)
            assert new["val_accuracy_per_epoch"] == pytest.approx(old["val_accuracy_per_epoch"], abs=1e-6)


def test_a_final_stage_whose_students_start_from_the_teacher(smoke_run, tmp_path):
    """`student.init: teacher`: every run starts from the fine-tuned teacher, and the final stage
    rebuilds each one from the same weights before loading its checkpoint (a checkpoint holds the
    trained weights only): the saved student scores on validation what its run measured there."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForSequenceClassification

    from kdray.cli.main import main
    from kdray.config import load_config
    from kdray.data.load import load_data
    from kdray.data.tokenize import tokenize
    from kdray.stages.teacher import prepare_teacher
    from kdray.train.batches import Split
    from kdray.train.loop import predict_logits
    from kdray.train.models import from_pretrained_dir, load_tokenizer

    run = tmp_path / "smoke"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("wandb"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["student"]["init"] = "teacher"
    config["train"]["precision"] = "fp32"  # validation as it ran and as it is recomputed here: exact
    config["final"]["baselines"] = False  # the students alone
    config["serve"].update(export=False, runtime="pytorch")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = pq.read_table(run / "search" / "trials.parquet").to_pylist()  # the search's trials started elsewhere
    pq.write_table(pa.Table.from_pylist([{**r, "checkpoint_path": None} for r in rows]), run / "search" / "trials.parquet")
    assert main(["final", "--run", str(run), "--wandb", "disabled", "--seeds", "2"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert "started from the fine-tuned teacher" in results["run"]["student_model"]

    cfg = load_config(run / "config.yaml")
    task = load_data(cfg.data)
    teacher = from_pretrained_dir(prepare_teacher(cfg, task).model_dir)  # the cached teacher: no training
    student = AutoModelForSequenceClassification.from_pretrained(run / "final" / "student", dtype=torch.float32)
    # LoRA leaves the embeddings frozen: the shipped student's are the teacher's.
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    val = Split.from_dataset(tokenize(task, load_tokenizer(cfg.student), cfg.data.max_length)[0]["validation"])
    logits = predict_logits(student, val, 64, load_tokenizer(cfg.student).pad_token_id, torch.device("cpu"),
                            precision="fp32")
    seed = results["variants"]["student"]["chosen_seed"]
    shipped = next(r for r in results["variants"]["student"]["runs"] if r["seed"] == seed)
    assert float((logits.argmax(-1) == val.labels).mean()) == pytest.approx(shipped[M.VAL_ACCURACY], abs=1e-9)


def test_error_analysis_buckets_by_hand():
    texts = ["good", "not good at all", "bad", "a very long text that is not bad at all really",
             "fine film", "it isn't great"]
    labels = np.array([1, 1, 0, 1, 1, 0])
    pred = np.array([1, 0, 0, 0, 1, 1])
    prob = np.array([0.9, 0.8, 0.7, 0.95, 0.6, 0.55])
    teacher = np.array([1, 1, 0, 0, 1, 0])
    ea = error_analysis(texts, labels, pred, prob, teacher, ["neg", "pos"], per_bucket=1)
    assert (ea["errors"], ea["teacher_errors"]) == (3, 1)
    rows = {b["bucket"].split(" (")[0]: b for b in ea["buckets"]}
    neg = rows["contains negation"]  # "not good at all", "... not bad at all ...", "it isn't great"
    assert (neg["examples"], neg["errors"]) == (3, 3) and neg["teacher_error_rate"] == pytest.approx(1 / 3)
    assert [e["text"] for e in neg["shown"]] == [texts[3]]  # the most confident mistake
    assert (rows["no negation"]["examples"], rows["no negation"]["errors"]) == (3, 0)
    pos_neg = rows["pos -> neg"]
    assert (pos_neg["examples"], pos_neg["errors"], pos_neg["error_rate"]) == (4, 2, 0.5)
    assert pos_neg["teacher_error_rate"] == 0.25
    assert (rows["neg -> pos"]["examples"], rows["neg -> pos"]["errors"]) == (2, 1)


def test_predict_cli_prints_labels_and_refuses_what_is_not_a_classifier(smoke_run, tmp_path):
    student = smoke_run / "final" / "student"
    r = cli("predict", "--model", str(student), "a gripping film", "a dull mess")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("negative", "positive") for line in lines), r.stdout
    r = cli("predict", "--model", str(student), input="one\n\ntwo\n")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 2, r.stdout + r.stderr

    for bad, says in ((smoke_run / "final" / "adapter", "PEFT adapter"), (tmp_path, "no config.json"),
                      (tmp_path / "missing", "no such directory")):
        r = cli("predict", "--model", str(bad), "text")
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    r = cli("predict", "--model", str(tmp_path), "text")
    assert r.returncode == 2 and "not a text classifier" in r.stderr, r.stderr


def test_final_cli_refuses_a_directory_without_a_search(tmp_path):
    r = cli("final", "--run", str(tmp_path))
    assert r.returncode == 2 and "not a finished search" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_damaged_trials_file_stops_the_final_stage_with_the_fix(smoke_run, tmp_path):
    """A run file cut short (a full disk, a half copy) is named, with how to rebuild it, before
    anything trains; the run's other files are left as they were."""
    run = tmp_path / "smoke"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("wandb", "train", "final"))
    with open(run / "search" / "trials.parquet", "r+b") as f:
        f.truncate(64)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    r = cli("final", "--run", str(run))
    message = r.stderr + r.stdout
    assert r.returncode == 2 and "Traceback" not in message, message[-3000:]
    assert "trials.parquet" in message and "damaged" in message and "Fix:" in message, message[-3000:]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_truncation_stats_count_the_texts_max_length_cuts():
    from datasets import Dataset

    from kdray.config import ModelConfig
    from kdray.evaluate.scores import truncation_stats
    from kdray.train.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name="embedded:minilm-l6"))
    texts = ["good", "a fine film", " ".join(["word"] * 30), " ".join(["word"] * 50)]  # 3, 5, 32, 52 tokens
    stats = truncation_stats(Dataset.from_dict({"text": texts, "label": [0] * 4}), tok, 16)
    assert stats["max_length"] == 16 and stats["truncated_share"] == 0.5 and stats["median_tokens"] == 18.5


def test_report_cli_rebuilds_and_exports_the_report(smoke_run, tmp_path):
    run = tmp_path / "smoke"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("wandb", "train", "final"))
    shutil.copytree(smoke_run / "final", run / "final", ignore=shutil.ignore_patterns("student", "adapter"))
    for p in [run / "report.md", run / "results.json", *(run / "plots").iterdir()]:
        p.unlink()
    r = cli("report", "--run", str(run), "--wandb", "disabled", "--export", str(tmp_path / "example"))
    assert r.returncode == 0, r.stderr
    example = tmp_path / "example"
    assert (example / "report.md").read_text() == (run / "report.md").read_text()
    assert sorted(p.name for p in (example / "plots").iterdir()) == sorted(f"{name}.png" for name in PLOTS)
    results = json.loads((example / "results.json").read_text())
    assert [c["claim"].split(" (")[0] for c in results["claims"]] == [
        "student within 2 pt of the teacher's test accuracy", "student fits the budget",
        "student at least 1.5x faster than the teacher at batch 1", "KD beats no KD",
        "LoRA beats a frozen encoder + head"]
    assert "| claim | target | measured | holds |" in (example / "report.md").read_text()


def test_claims_hold_or_not_from_the_numbers():
    from kdray.report.results import claims

    def compare(drop, speedup, kd, lora, std=0.5, seeds=3):
        pair = lambda d: {"test_accuracy_diff_pt": d, "student_std_pt": std, "baseline_std_pt": std, "seeds": seeds}
        return {"student_vs_teacher": {"test_accuracy_drop_pt": drop, "latency_speedup_p50": speedup},
                "kd_vs_no_kd": pair(kd), "lora_vs_head_only": pair(lora)}

    ref = {"reference": "FinBERT", "reference_accuracy": 0.97}
    holds = [c["holds"] for c in claims(compare(1.9, 1.6, 0.9, 10.0), 900, 1000, ref, 0.95, 0.93)]
    assert holds == [True, True, True, True, True, None]  # SE of the differences: sqrt(2 * 0.25 / 3) = 0.41
    holds = [c["holds"] for c in claims(compare(2.1, 1.4, 0.6, -1.0), 1001, 1000, {}, 0.95, 0.93)]
    assert holds == [False, False, False, False, False]  # +0.6 pt is 1.5 SE: under 2, not shown
    last = claims(compare(1.0, 2.0, 1.0, 1.0), 10, 1000, ref, 0.95, 0.93)[-1]
    assert last["claim"] == "reference: FinBERT" and last["measured"] == "teacher 95.0%, student 93.0% (-4.0 pt)"


def test_best_config_reruns_as_a_space_and_kdray_runs_lists_the_run(smoke_run):
    """`best_config.yaml` is a space (its run's config.yaml as `base`, the winner's knobs over it);
    `kdray runs` reads the run back without Ray or torch."""
    from kdray.config import load_config

    best = yaml.safe_load((smoke_run / "best_config.yaml").read_text())
    cfg = load_config(smoke_run / "best_config.yaml")
    assert cfg.name == "smoke" and cfg.train.alpha == best["train"]["alpha"]
    assert cfg.train.epochs == best["train"]["epochs"] and cfg.student.lora.r == best["student"]["lora"]["r"]
    assert cfg.student.lora.layers == best["student"]["lora"]["layers"]
    assert cfg.data == load_config(smoke_run / "config.yaml").data  # everything else from the run

    out = subprocess.run([sys.executable, "-m", "kdray", "runs", "--output-dir", str(smoke_run.parent)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (row,) = [line.split() for line in out.stdout.splitlines() if line.startswith("smoke ")]
    results = json.loads((smoke_run / "results.json").read_text())
    student = np.mean([r["test/accuracy"] for r in results["variants"]["student"]["runs"]])
    assert row[:3] == ["smoke", "reported", "6"]
    assert row[3:] == [f"{100 * best['best_val_accuracy']:.1f}", f"{100 * student:.1f}",
                       f"{100 * results['teacher']['test/accuracy']:.1f}"]
