"""The served student: ONNX fp32 and int8 forms made with torch.onnx and onnxruntime, checked
against PyTorch, run without torch, benchmarked where they run, and what happens when a model
cannot be exported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import torch

from kdray import metrics as M
from kdray.report.results import SCHEMA_PATH
from kdray.serve.export import TOLERANCE, check_form, make_forms
from kdray.train.batches import Split
from tests.conftest import ROOT, TINY_CONFIGS


def _random_split(vocab: int, rows: int = 48, seed: int = 0) -> Split:
    """Token-id rows of 3-20 tokens (pads come from batching), as a tokenized split holds them."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, vocab, int(rng.integers(3, 21))).astype(np.int32) for _ in range(rows)]
    return Split(ids, np.zeros(rows, dtype=np.int64), np.arange(rows, dtype=np.int64))


def _tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = dict(TINY_CONFIGS[arch])
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg,
                                                                               num_labels=3)).eval()


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_both_forms_export_load_in_onnxruntime_and_match_pytorch(arch):
    """Each form loads in onnxruntime, is dynamic in batch and length (padded batches of other
    shapes than the export's), and its logits are within the recorded tolerance of PyTorch's."""
    model = _tiny(arch)
    forms = make_forms(model)
    assert set(forms) == {"onnx", "onnx-int8"} and len(forms["onnx-int8"]) < len(forms["onnx"])
    split = _random_split(model.config.vocab_size)
    fp32, int8 = (check_form(forms[rt], model, split, rt) for rt in ("onnx", "onnx-int8"))
    assert fp32["passed"] and fp32["max_abs_logit_diff"] <= TOLERANCE["onnx"] and fp32["same_class"] == 1.0
    assert int8["passed"] and 0 < int8["max_abs_logit_diff"] <= TOLERANCE["onnx-int8"]  # int8 is not exact
    assert fp32["rows"] == int8["rows"] == len(split)


def test_the_logits_check_fails_a_form_of_another_model():
    """The check compares numbers, not shapes: a form made from other weights of the same
    architecture fails it."""
    form = make_forms(_tiny("bert", seed=1), ("onnx",))["onnx"]
    check = check_form(form, _tiny("bert", seed=2), _random_split(TINY_CONFIGS["bert"].get("vocab_size", 30522)), "onnx")
    assert not check["passed"] and check["max_abs_logit_diff"] > TOLERANCE["onnx"]


def test_the_smoke_run_serves_its_student_in_three_forms(smoke_run):
    """The final stage wrote both ONNX forms beside final/student, each a directory that loads on
    its own; every form of the student and the teacher was benchmarked and scored on test; the
    report names the recommended form with its two labelled ratios."""
    results = json.loads((smoke_run / "results.json").read_text())
    jsonschema.validate(results, json.loads(SCHEMA_PATH.read_text()))
    serving = results["serving"]
    assert set(serving["forms"]) == {f"{m}/{rt}" for m in ("student", "teacher") for rt in ("pytorch", "onnx", "onnx-int8")}
    for name, b in serving["forms"].items():
        assert b["latency_ms_p50"] > 0 and b["throughput_per_s"] > 0 and 0 <= b[M.TEST_ACCURACY] <= 1, name
        assert b["threads"] == serving["forms"]["student/pytorch"]["threads"], name  # both runtimes alike
    for rt in ("onnx", "onnx-int8"):
        form = smoke_run / "final" / f"student-{rt}"
        assert {"model.onnx", "tokenizer.json", "kdray.json", "config.json"} <= {p.name for p in form.iterdir()}
        meta = json.loads((form / "kdray.json").read_text())
        assert meta["runtime"] == rt and meta["check"]["passed"] and meta["label_names"] == ["negative", "positive"]
    assert serving["recommended"] == "student/onnx-int8" and serving["why"] == "serve.runtime: onnx-int8"
    h = serving["headline"]
    t_pt, t_int8 = serving["forms"]["teacher/pytorch"], serving["forms"]["teacher/onnx-int8"]
    assert h["speedup_vs_teacher_pytorch"] == pytest.approx(t_pt["latency_ms_p50"] / h["latency_ms_p50"])
    assert h["speedup_vs_teacher_same_runtime"] == pytest.approx(t_int8["latency_ms_p50"] / h["latency_ms_p50"])
    report = (smoke_run / "report.md").read_text()
    assert "**Served as `student/onnx-int8`" in report and "as fast as the teacher served in PyTorch fp32" in report
    assert "as fast as the teacher in the same runtime (onnx-int8)" in report and "## Served" in report


def test_recommend_passes_over_a_form_that_loses_too_much_accuracy():
    from kdray.stages.serving import recommend

    def form(model, runtime, ms, acc):
        return {"model": model, "runtime": runtime, "latency_ms_p50": ms, M.TEST_ACCURACY: acc, "size_mb": 1.0}

    bench = {"student/pytorch": form("student", "pytorch", 9.0, 0.84), "student/onnx": form("student", "onnx", 4.0, 0.84),
             "student/onnx-int8": form("student", "onnx-int8", 2.0, 0.82), "teacher/pytorch": form("teacher", "pytorch", 16, 0.85),
             "teacher/onnx": form("teacher", "onnx", 8.0, 0.85), "teacher/onnx-int8": form("teacher", "onnx-int8", 4.0, 0.84)}
    ok = recommend(bench, "onnx-int8", 0.03)
    assert ok["recommended"] == "student/onnx-int8" and not ok["flagged"]
    assert ok["headline"]["speedup_vs_teacher_pytorch"] == 8.0 and ok["headline"]["speedup_vs_teacher_same_runtime"] == 2.0
    strict = recommend(bench, "onnx-int8", 0.01)  # int8 lost 2 points
    assert strict["flagged"] == ["student/onnx-int8"] and strict["recommended"] == "student/onnx"
    assert "loses more than serve.max_accuracy_drop" in strict["why"]
    assert strict["headline"]["speedup_vs_teacher_same_runtime"] == 2.0  # against the ONNX fp32 teacher


def test_predict_runs_an_onnx_form_without_torch(smoke_run):
    """`kdray predict` on an ONNX form, in a process where importing torch fails: onnxruntime and
    the tokenizer alone. Its labels are the PyTorch student's on most texts (int8 is not exact)."""
    texts = ["a gripping, funny and moving film", "a dull mess", "not bad at all", "the worst film of the year"]
    no_torch = ("import sys; sys.modules['torch'] = None; from kdray.cli.main import main; "
                "sys.exit(main(sys.argv[1:]))")
    out = {}
    for form in ("student-onnx", "student-onnx-int8"):
        r = subprocess.run([sys.executable, "-c", no_torch, "predict", "--model", str(smoke_run / "final" / form), *texts],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        out[form] = [line.split("\t") for line in r.stdout.strip().splitlines()]
        assert [row[2] for row in out[form]] == texts and all(row[0] in ("negative", "positive") for row in out[form])
        assert all(0.5 <= float(row[1]) <= 1 for row in out[form])
    r = subprocess.run([sys.executable, "-m", "kdray", "predict", "--model", str(smoke_run / "final" / "student"), *texts],
                       capture_output=True, text=True, cwd=ROOT)
    pytorch = [line.split("\t") for line in r.stdout.strip().splitlines()]
    assert [row[0] for row in out["student-onnx"]] == [row[0] for row in pytorch]  # fp32: the same classes
    assert [float(row[1]) for row in out["student-onnx"]] == pytest.approx([float(row[1]) for row in pytorch], abs=1e-3)


def test_a_student_the_exporter_cannot_handle_keeps_its_pytorch_form(smoke_run, tmp_path):
    """A real architecture torch.onnx cannot export (Longformer's data-dependent attention
    windows): `kdray export` exits 2 naming the exporter's reason with the fix, writes no form,
    and leaves final/student as it was; the final stage's step says the same and goes on."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from kdray.artifacts import RunDir
    from kdray.config import load_config
    from kdray.data.load import load_data
    from kdray.stages.serving import export_student

    run = tmp_path / "smoke"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("wandb", "train", "search", "final"))
    student = run / "final" / "student"
    config = AutoConfig.for_model("longformer", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, attention_window=4, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(student)
    AutoTokenizer.from_pretrained(smoke_run / "final" / "student").save_pretrained(student)
    (student / "kdray.json").write_text((smoke_run / "final" / "student" / "kdray.json").read_text())
    before = {p: p.stat().st_mtime_ns for p in student.iterdir()}

    r = subprocess.run([sys.executable, "-m", "kdray", "export", "--run", str(run)], capture_output=True, text=True,
                       cwd=ROOT)
    message = r.stderr + r.stdout
    assert r.returncode == 2 and "Traceback" not in message, message[-3000:]
    assert "cannot export this longformer model" in message and "Fix:" in message, message[-3000:]
    assert sorted(p.name for p in (run / "final").iterdir()) == ["student"]
    assert {p: p.stat().st_mtime_ns for p in student.iterdir()} == before

    cfg = load_config(run / "config.yaml")
    forms = export_student(cfg, load_data(cfg.data), RunDir(run))
    assert set(forms) == {"onnx", "onnx-int8"} and all("cannot export" in f["error"] for f in forms.values())
