"""The student as it is served: its ONNX forms written beside `final/student/` and checked on
validation (`export_student`), then every form of the student and the teacher benchmarked where
it runs and scored on the test split the final stage read (`measure_forms`), and the form to
ship recommended (`recommend`).

A form that cannot be made, or fails its logits check, is said so and left out: the PyTorch
student and every other result of the final stage stay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdray import metrics as M
from kdray.artifacts import RunDir
from kdray.config import RunConfig


#: The forms the final stage makes beside the PyTorch student.
ONNX_RUNTIMES = ("onnx", "onnx-int8")


def export_student(cfg: RunConfig, task: Any, run: RunDir, who: str = "final") -> dict[str, dict[str, Any]]:
    """Write `final/student-onnx` and `final/student-onnx-int8` from `final/student`, each checked
    against PyTorch's fp32 logits on the validation split. Returns per runtime its directory,
    size and check, or the error that kept it from being made (printed with the fix, each line
    starting with `who`: the command or stage)."""
    from kdray.data.tokenize import tokenize
    from kdray.serve.export import ExportError, check_form, make_forms, write_form
    from kdray.train.batches import Split
    from kdray.train.models import from_pretrained_dir, load_tokenizer

    model = from_pretrained_dir(run.student)
    try:
        if not (run.student / "tokenizer.json").is_file():
            raise ExportError("the student's tokenizer has no tokenizer.json (not a fast tokenizer), which an ONNX "
                              "form needs to run without transformers")
        forms = make_forms(model)
    except ExportError as e:
        print(f"{who}: the student's ONNX forms could not be made: {e}. The PyTorch student (final/student) and every "
              f"other result are kept. Fix: serve final/student with PyTorch (serve.runtime: pytorch), or report the "
              f"exporter's error for this architecture.", flush=True)
        return {rt: {"error": str(e)} for rt in ONNX_RUNTIMES}
    validation = Split.from_dataset(tokenize(task, load_tokenizer(cfg.student), cfg.data.max_length,
                                             cfg.cache_dir)[0]["validation"])
    out = {}
    for runtime, onnx in forms.items():
        check = check_form(onnx, model, validation, runtime)
        if check["passed"]:
            path = write_form(run.served(runtime), onnx, run.student, check, runtime)
            out[runtime] = {"dir": str(path), "size_mb": len(onnx) / 2**20, "check": check}
        else:
            out[runtime] = {"error": f"its validation logits differ from PyTorch's by up to "
                                     f"{check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:g})",
                            "check": check}
            print(f"{who}: the student's {runtime} form failed its logits check ({out[runtime]['error']}); it is not "
                  f"written. Fix: serve final/student or another form; the PyTorch student is kept.", flush=True)
    _say_exported(out, who)
    return out


def _say_exported(out: dict[str, dict[str, Any]], who: str) -> None:
    written = [f"{rt} {f['size_mb']:.1f} MB (validation logits within {f['check']['max_abs_logit_diff']:.1e} of "
               f"PyTorch's, the same class on {100 * f['check']['same_class']:.1f}%)" for rt, f in out.items() if "dir" in f]
    if written:
        print(f"{who}: the student's ONNX forms: {'; '.join(written)}; beside {Path(next(iter(out.values()))['dir']).parent}"
              if all("dir" in f for f in out.values()) else f"{who}: the student's ONNX forms: {'; '.join(written)}",
              flush=True)


def measure_forms(cfg: RunConfig, test: Any, run: RunDir, teacher_dir: Path, plan: Any,
                  exported: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every form of the student (those exported) and of the teacher (made here, not saved),
    benchmarked in one Ray task on the students' kind of device and scored on `test`; and the
    form recommended (`recommend`)."""
    from kdray.data.load import split_texts
    from kdray.evaluate.serving import benchmark_forms
    from kdray.runtime.tasks import on_device

    forms = _forms(cfg, run, teacher_dir, exported)
    texts = split_texts(test)
    labels = np.asarray(test["label"])
    print(f"final: benchmarking the served forms ({', '.join(f.name for f in forms)}): batch 1 x "
          f"{cfg.final.latency_runs} with tokenization, the {len(texts)} test texts at batch "
          f"{cfg.final.throughput_batch_size}", flush=True)
    bench, where = on_device(plan, benchmark_forms, forms, texts, labels, cfg)
    for name, b in bench.items():
        if "skipped" in b:
            print(f"  {name:<20} skipped: {b['skipped']}")
        else:
            print(f"  {name:<20} p50 {b['latency_ms_p50']:7.2f} ms  p95 {b['latency_ms_p95']:7.2f} ms  "
                  f"{b['throughput_per_s']:8.1f}/s  {b['size_mb']:6.1f} MB  test acc {100 * b[M.TEST_ACCURACY]:.1f}%")
    served = {"runtime": cfg.serve.runtime, "max_accuracy_drop": cfg.serve.max_accuracy_drop,
              "device": where["device_name"], "forms": bench,
              "exported": {rt: {k: v for k, v in f.items() if k != "dir"} for rt, f in exported.items()}}
    served.update(recommend(bench, cfg.serve.runtime, cfg.serve.max_accuracy_drop))
    print(f"final: recommended form: {served['recommended']} ({served['why']})", flush=True)
    return served


def _forms(cfg: RunConfig, run: RunDir, teacher_dir: Path, exported: dict[str, dict[str, Any]]) -> list[Any]:
    """The student's exported forms and the teacher's (exported in memory), as `Form`s."""
    from kdray.evaluate.serving import Form
    from kdray.serve.export import ExportError, make_forms
    from kdray.train.models import from_pretrained_dir, to_payload

    def tokenizer_of(d: Path) -> str:
        return (d / "tokenizer.json").read_text(encoding="utf-8")

    n = cfg.data.max_length
    forms = [Form("student", "pytorch", tokenizer_of(run.student), n, _mb(run.student / "model.safetensors"),
                  payload=to_payload(from_pretrained_dir(run.student)))]
    forms += [Form("student", rt, tokenizer_of(run.student), n, f["size_mb"], onnx=Path(f["dir"], "model.onnx").read_bytes())
              for rt, f in exported.items() if "dir" in f]
    teacher = from_pretrained_dir(teacher_dir)
    forms.append(Form("teacher", "pytorch", tokenizer_of(teacher_dir), n, _mb(teacher_dir / "model.safetensors"),
                      payload=to_payload(teacher)))
    try:
        for rt, onnx in make_forms(teacher).items():
            forms.append(Form("teacher", rt, tokenizer_of(teacher_dir), n, len(onnx) / 2**20, onnx=onnx))
    except ExportError as e:
        print(f"final: the teacher's ONNX forms could not be made ({e}); the student's are compared with the "
              f"PyTorch teacher only", flush=True)
    return forms


def _mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def recommend(bench: dict[str, dict], runtime: str, max_drop: float) -> dict[str, Any]:
    """The student form to ship: `serve.runtime`'s, unless it loses more than `max_drop` test
    accuracy against the PyTorch fp32 student (flagged) or was not measured; then the fastest
    form that keeps it. The headline's two ratios: against the teacher as served in PyTorch fp32,
    and against the teacher in the recommended form's own runtime."""
    reference = bench["student/pytorch"][M.TEST_ACCURACY]
    measured = {n: b for n, b in bench.items() if b["model"] == "student" and "skipped" not in b}
    flagged = sorted(n for n, b in measured.items() if reference - b[M.TEST_ACCURACY] > max_drop + 1e-12)
    keeps = {n: b for n, b in measured.items() if n not in flagged}
    wanted = f"student/{runtime}"
    if wanted in keeps:
        name, why = wanted, f"serve.runtime: {runtime}"
    else:
        name = min(keeps, key=lambda n: keeps[n]["latency_ms_p50"])
        reason = "loses more than serve.max_accuracy_drop" if wanted in flagged else "was not measured here"
        why = f"the fastest form within serve.max_accuracy_drop; serve.runtime's {runtime} {reason}"
    s = bench[name]
    same = bench.get(f"teacher/{s['runtime']}", {})
    t_pt = bench["teacher/pytorch"]
    return {"recommended": name, "why": why, "flagged": flagged, "headline": {
        "form": name, "latency_ms_p50": s["latency_ms_p50"], "test_accuracy": s[M.TEST_ACCURACY],
        "accuracy_drop_pt_vs_fp32_student": 100 * (reference - s[M.TEST_ACCURACY]), "size_mb": s["size_mb"],
        "size_ratio_vs_fp32_student": s["size_mb"] / bench["student/pytorch"]["size_mb"],
        "speedup_vs_teacher_pytorch": t_pt["latency_ms_p50"] / s["latency_ms_p50"],
        "speedup_vs_teacher_same_runtime": (same["latency_ms_p50"] / s["latency_ms_p50"]
                                            if "latency_ms_p50" in same else None)}}
