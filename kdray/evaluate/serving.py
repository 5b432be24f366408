"""The served forms benchmarked where they run: each model in each runtime (PyTorch fp32, ONNX
Runtime fp32, ONNX Runtime int8) on real sentences, tokenization included in every call.

One process, one model after another: load (peak memory counts load and inference), warm-up,
one pass over the whole test split at the throughput batch (its logits score the form on test),
then batch-1 latency with the forms taking turns (`interleaved`), so drifts of the machine hit
every form alike. PyTorch and ONNX Runtime run on the same number of threads, and both tokenize with
the form's own `tokenizer.json` (the `tokenizers` library, as `transformers` does).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from kdray.config import RunConfig
from kdray.evaluate.benchmark import memory_mark, memory_peak
from kdray.evaluate.scores import split_scores
from kdray.trials import shape_text


@dataclasses.dataclass
class Form:
    """One model in one runtime, as a measuring task receives it (bytes, not paths: the task may
    run on another node)."""

    model: str
    """`student` or `teacher`."""
    runtime: str
    """`pytorch`, `onnx` or `onnx-int8` (`kdray.config.SERVE_RUNTIMES`)."""
    tokenizer_json: str
    max_length: int
    size_mb: float
    """The form's model file (safetensors or ONNX)."""
    payload: Any = None
    """PyTorch: `kdray.train.models.to_payload` of the model."""
    onnx: bytes | None = None
    """ONNX runtimes: the graph and its weights."""

    @property
    def name(self) -> str:
        return f"{self.model}/{self.runtime}"


Runner = Callable[[list], np.ndarray]


def skip_reason(form: Form, device: Any) -> str | None:
    """Why `form` is not benchmarked on `device`, or None. On a GPU an ONNX form needs
    onnxruntime's CUDA provider, and dynamic int8 is a CPU form."""
    if device.type != "cuda" or form.runtime == "pytorch":
        return None
    if form.runtime == "onnx-int8":
        return "dynamic int8 is a CPU form (ONNX Runtime's CUDA provider runs its integer MatMuls on the CPU)"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu); the form is exported "
                "for CPU serving")
    return None


def timing_device(runtime: str, device: Any) -> Any:
    """Where a form of `runtime` is timed by a task that holds `device`: dynamic int8 is a CPU form,
    and ONNX fp32 runs on the GPU only through onnxruntime's CUDA provider."""
    import torch

    probe = Form("", runtime, "", 0, 0.0)
    return torch.device("cpu") if device.type == "cuda" and skip_reason(probe, device) else device


def runner(form: Form, device: Any, threads: int) -> tuple[Runner, str]:
    """`texts -> logits` of `form` on `device`, tokenization included, and what runs it."""
    import torch

    from kdray.serve.export import input_names
    from kdray.serve.forms import OnnxClassifier, encode, load_tokenizer

    if form.runtime != "pytorch":
        clf = OnnxClassifier(form.onnx, form.tokenizer_json, form.max_length, [], threads=threads,
                             use_cuda=device.type == "cuda")
        return clf.logits, f"onnxruntime {clf.provider}"
    from kdray.train.models import from_payload
    from kdray.train.precision import autocast_for, serving_precision

    model = from_payload(form.payload).to(device).eval()
    tok, names = load_tokenizer(form.tokenizer_json, form.max_length), input_names(model)
    autocast = autocast_for(device, serving_precision(device))

    def run(texts: list) -> np.ndarray:
        with torch.inference_mode(), autocast:
            x = {k: torch.from_numpy(v).to(device) for k, v in encode(tok, texts, names).items()}
            return model(**x).logits.float().cpu().numpy()

    return run, f"torch {serving_precision(device)} on {device.type}"


def benchmark_forms(device: Any, forms: list[Form], texts: list, labels: np.ndarray, cfg: Any) -> dict[str, dict]:
    """Every form's latency (batch 1, p50/p95), throughput, peak memory, size and test scores;
    a skipped form says why (`skip_reason`)."""
    import torch

    fc, threads = cfg.final, torch.get_num_threads()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, dict] = {}
    runners: dict[str, Runner] = {}
    for form in forms:
        why = skip_reason(form, device)
        if why is not None:
            out[form.name] = {"model": form.model, "runtime": form.runtime, "size_mb": form.size_mb, "skipped": why}
            continue
        base = memory_mark(device)
        run, engine = runner(form, device, threads)
        for i in range(max(fc.warmup_runs, 1)):
            run([texts[i % len(texts)]])
        sync()
        t0 = time.perf_counter()
        logits = np.concatenate([run(texts[i:i + fc.throughput_batch_size])
                                 for i in range(0, len(texts), fc.throughput_batch_size)])
        sync()
        seconds = time.perf_counter() - t0
        peak, kind = memory_peak(device, base)
        out[form.name] = {"model": form.model, "runtime": form.runtime, "engine": engine, "threads": threads,
                          "size_mb": form.size_mb, "throughput_per_s": len(texts) / seconds,
                          "throughput_batch_size": fc.throughput_batch_size, "peak_memory_mb": float(peak),
                          "memory_kind": kind, **split_scores(logits, labels, logits.shape[-1])}
        runners[form.name] = run
    for name, ms in interleaved(runners, texts, fc.latency_runs, sync).items():
        out[name].update({"latency_ms_p50": float(np.percentile(ms, 50)), "latency_ms_p95": float(np.percentile(ms, 95)),
                          "latency_runs": len(ms)})
    return out


#: Consecutive sentences each form runs in its turn. The first call of a turn is not timed: the
#: form before it leaves its threads spinning for a while (ONNX Runtime's pool, OpenMP's), and the
#: call that meets them would time the other form's wind-down.
TURN = 10
#: The pause before each turn, in seconds: long enough for the threads the previous form left
#: spinning to go to sleep.
SETTLE_S = 0.05


def interleaved(runners: dict[str, Runner], texts: list, runs: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Batch-1 latency in ms of each runner, tokenization included: the runners take turns, each a
    turn of `TURN` sentences after one untimed call, until each has timed `runs` (the sentences
    cycled), so slow drifts of the machine hit every form alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for start in range(0, runs, TURN):
        for name, run in runners.items():
            time.sleep(SETTLE_S)
            run([texts[start % len(texts)]])
            for i in range(start, min(start + TURN, runs)):
                sync()
                t0 = time.perf_counter()
                run([texts[i % len(texts)]])
                sync()
                times[name].append((time.perf_counter() - t0) * 1000)
    return times


def time_shapes(device: Any, cfg: RunConfig, num_labels: int, shapes: list[list[int] | None], texts: list,
                student_tokenizer: str, teacher_tokenizer: str) -> dict:
    """The task body: each shape and the teacher built with random weights (latency does not
    depend on them), in `serve.runtime`'s form, warmed, then timed round-robin at batch 1 on the
    first validation texts, tokenization included (`kdray.evaluate.serving`)."""
    import numpy as np
    import torch

    from kdray.serve.export import make_forms
    from kdray.train.models import build_model, to_payload

    runtime = cfg.serve.runtime
    where = timing_device(runtime, device)
    models = {str(shape_text(s)): (dataclasses.replace(cfg.student, keep_layers=s), student_tokenizer) for s in shapes}
    models["teacher"] = (cfg.teacher, teacher_tokenizer)
    runners, engine = {}, ""
    for name, (spec, tok) in models.items():
        model = build_model(spec, num_labels).eval()
        form = Form(name, runtime, tok, cfg.data.max_length, 0.0, payload=to_payload(model) if runtime == "pytorch"
                    else None, onnx=None if runtime == "pytorch" else make_forms(model, (runtime,))[runtime])
        runners[name], engine = runner(form, where, torch.get_num_threads())
        for i in range(max(cfg.final.warmup_runs, 1)):
            runners[name]([texts[i % len(texts)]])
    sync = torch.cuda.synchronize if where.type == "cuda" else (lambda: None)
    p50 = {name: float(np.percentile(t, 50)) for name, t in interleaved(runners, texts, cfg.final.latency_runs,
                                                                        sync).items()}
    return {"teacher": p50.pop("teacher"), "shapes": p50, "runtime": runtime, "engine": engine}
