"""Final stage: retrain the search's best configuration, benchmark it against the teacher and the
seeds' baselines, and hand over a deployable student.

1. The best configuration (validation only) is retrained with `final.seeds` seeds, beside the
   two baselines of the seeds with the same budget, data, alpha, T, learning rate and epochs:
   the same LoRA student without KD (`alpha=1`) and the frozen-encoder,
   head-only student. They are Tune trials of the search's own trainable, so they
   run `final.seeds x 3` at `search.concurrency` through the trial engine.
2. The seed with the best validation accuracy is kept; its LoRA weights are merged
   (`merge_and_unload`) and the student is saved with its tokenizer and label names under
   `final/student/`, loadable by `transformers.pipeline("text-classification", model=...)`;
   its unmerged PEFT adapter goes to `final/adapter/`.
3. The test split is read here, once. Every model is scored on it; the teacher, the merged and
   unmerged student and the baselines are benchmarked one after another in this process on the
   same inputs (latency at batch 1, throughput at batch 32, peak memory, size).
4. Error analysis of the student's test mistakes: short/long, negation, true->predicted.

`final/final.json` holds every measurement and `final/predictions.parquet` the test predictions;
`kdray.report` turns them into `results.json`, `report.md` and `plots/`.

    python -m kdray.final --run runs/NAME [--seeds N]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdray import metrics as M
from kdray.config import RunConfig, help_epilog
from kdray.errors import UserError
from kdray.rundir import RunDir
from kdray.trials import TrialConfig

if TYPE_CHECKING:  # torch loads when the stage runs, so `kdray final --run BAD` answers at once
    import torch
    from torch import nn

VARIANTS = {
    "student": "distilled LoRA student (the search's best configuration)",
    "no_kd": "the same LoRA student on labels only (alpha = 1)",
    "head_only": "frozen encoder, trained classifier head (same alpha, T, learning rate, epochs)",
}
#: What the benchmark table shows, in order: name -> description.
BENCHMARKED = {
    "teacher": "fine-tuned teacher",
    "student": "student, LoRA merged (final/student)",
    "student_unmerged": "student, LoRA unmerged (PEFT)",
    "no_kd": VARIANTS["no_kd"] + ", merged",
    "head_only": VARIANTS["head_only"],
}


# ----------------------------------------------------------------------------- the runs


def final_cases(cfg: RunConfig, best: dict[str, Any], num_labels: int, seeds: int) -> list[TrialConfig]:
    """The final runs: the best configuration and each baseline, per seed, each with its
    `trainable_params` counted exactly as the budget counts it."""
    from kdray.budget import count

    chosen = TrialConfig.from_yaml(best)
    variants = {"student": {}}
    if cfg.final.baselines:
        variants.update({"no_kd": {"alpha": 1.0}, "head_only": {"mode": "head"}})
    cases = []
    # Variant by variant, the cheap head-only runs last: they fill the slots the last long runs
    # leave idle instead of a long run finishing alone.
    for variant, change in variants.items():
        for seed in cfg.repeat_seeds(seeds):
            case = dataclasses.replace(chosen, **change, variant=variant, seed=seed)
            cases.append(dataclasses.replace(case, trainable_params=count(case.student(cfg.student), num_labels)))
    return cases


def train_cases(cfg: RunConfig, job: Any, data: Any, cases: list[TrialConfig], storage: str,
                plan: Any) -> list[tuple[TrialConfig, str]]:
    """Train every case as a Tune trial of the engine, each holding what `plan` (the students'
    `kdray.resources.Plan`) gives a trial (Tune experiment and checkpoints under `storage`);
    returns `(case, last checkpoint path)` per case."""
    from ray import tune

    from kdray.cluster import storage_join
    from kdray.engine import checkpoint_path, distill_spec, progress_callback, tune_run_config, tune_trainable

    spec = distill_spec(cfg, job, data, storage_join(storage, "train"), plan.resources)
    progress = progress_callback(label=lambda t: TrialConfig.of_tune(t.config).label(), total=len(cases),
                                 concurrency=cfg.search.concurrency)
    tuner = tune.Tuner(
        tune_trainable(spec),
        param_space={"trial": tune.grid_search([case.to_tune() for case in cases])},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.search.concurrency, reuse_actors=cfg.search.reuse_actors),
        run_config=tune_run_config("tune", storage, keep=1, max_failures=cfg.search.max_failures, callbacks=[progress]),
    )
    out = []
    for r in tuner.fit():
        case, path = TrialConfig.of_tune(r.config), checkpoint_path(r)
        if r.error is not None or path is None:
            raise RuntimeError(f"final stage: the {case.variant} run with seed {case.seed} failed: {r.error}")
        out.append((case, path))
    return out


def search_checkpoint(run: RunDir, best: dict[str, Any]) -> str | None:
    """The chosen search trial's last checkpoint, when that trial trained all its epochs.

    It is the final stage's student run for the run's own seed: same configuration, seed, data
    and code, so retraining it would only repeat it (bit for bit on CPU; the smoke test checks
    it). None when the trial stopped early, or its checkpoint is not where it was written."""
    import pyarrow.parquet as pq

    rows = pq.read_table(run.trials).to_pylist()
    row = next((r for r in rows if r["trial_id"] == best["trial_id"]), None)
    path = None if row is None else row.get("checkpoint_path")
    if path is None or row["status"] != "completed" or ("://" not in path and not Path(path).is_dir()):
        return None
    return path


def load_trained(job: Any, case: TrialConfig, checkpoint_path: str, base: Any = None) -> tuple[nn.Module, list[dict]]:
    """Rebuild a case's model exactly as its trial did (from `base`, the `DistillData.student_base`
    it started from, when set) and load its trained weights (a checkpoint holds those only)."""
    from ray.train import Checkpoint

    from kdray.loop import load_checkpoint
    from kdray.models import build_student

    j = case.job(job)
    model = build_student(j.model, j.num_labels, j.label_names, seed=j.seed, base=base)
    with Checkpoint(checkpoint_path).as_directory() as d:
        _, history = load_checkpoint(Path(d), model)
    return model.eval(), history


# ----------------------------------------------------------------------------- measuring


def weights_mb(model: nn.Module) -> float:
    """Size of the model's weights serialised as one safetensors file (what serving it as
    loaded needs: an unmerged PEFT model counts base, adapter and its copy of the head). A
    quantised model, whose state holds packed parameters safetensors cannot store, is measured
    as `torch.save` writes it."""
    import io

    import torch
    from safetensors.torch import save

    state = model.state_dict()
    if any(not isinstance(t, torch.Tensor) or t.is_quantized for t in state.values()):
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.tell() / 2**20
    seen, tensors = set(), {}
    for name, t in state.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().cpu().contiguous()
    return len(save(tensors)) / 2**20


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _rss_mb() -> tuple[float, bool]:
    """(peak RSS since the last reset, True) where Linux gives it, else (current RSS, False)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, True
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20, False


def _memory_mark(device: torch.device) -> float:
    """Start a peak-memory window; returns the baseline (MB) that `_memory_peak` subtracts."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _memory_peak(device: torch.device, base: float) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - base, "cuda_max_allocated"
    now, is_peak = _rss_mb()
    return now - base, "rss_peak_growth" if is_peak else "rss_growth"


@dataclasses.dataclass
class Measured:
    """What the final stage's measuring task sends back to the driver."""

    runs: dict[str, list[dict]]
    """Per variant, each retrained run's validation history and test scores."""
    chosen: dict[str, tuple[TrialConfig, str]]
    """Per variant, the run with the best last-epoch validation accuracy: (case, checkpoint)."""
    benchmark: dict[str, dict]
    """Per model, latency, throughput, size and peak memory."""
    logits: dict[str, np.ndarray]
    """Per benchmarked model, its test logits (the throughput pass's)."""
    merge_diff: float
    """Merged vs unmerged student: the largest difference of their test logits, in fp32."""


def measure_models(device: torch.device, job: Any, base: Any, trained: list[tuple[TrialConfig, str]],
                   s_test: Any, t_test: Any, teacher: dict, t_pad: int, cfg: RunConfig) -> Measured:
    """The final stage's measuring, run as a Ray task on the students' kind of device
    (`kdray.tasks.on_device`): every retrained model's test scores, then the benchmark of the
    teacher (`teacher`: a `to_payload`), the shipped student merged and unmerged, and the
    baselines, on the same test inputs. `base`: the weights the students started from."""
    from kdray.loop import predict_logits, serving_precision
    from kdray.models import from_payload

    runs, chosen = score_runs(trained, job, s_test, device, len(job.label_names), cfg.final.throughput_batch_size,
                              base)
    case, path = chosen["student"]
    loaders = {
        "teacher": (lambda: from_payload(teacher), t_test, t_pad),
        "student": (lambda: _merged(load_trained(job, case, path, base)[0]), s_test, job.pad_token_id),
        "student_unmerged": (lambda: load_trained(job, case, path, base)[0], s_test, job.pad_token_id),
    }
    for v in ("no_kd", "head_only"):
        if v in chosen:
            loaders[v] = (lambda v=v: _merged(load_trained(job, *chosen[v], base)[0]), s_test, job.pad_token_id)
    bench, logits = benchmark(loaders, device, cfg)
    merged, unmerged = logits["student"], logits["student_unmerged"]
    if serving_precision(device) != "fp32":  # the timed passes ran under autocast: compare the weights in fp32
        merged, unmerged = (predict_logits(loaders[name][0]().to(device), s_test, cfg.final.throughput_batch_size,
                                           job.pad_token_id, device, precision="fp32")
                            for name in ("student", "student_unmerged"))
    return Measured(runs, chosen, bench, logits, float(np.abs(merged - unmerged).max()))


def benchmark(loaders: dict[str, tuple[Any, Any, int]], device: torch.device,
              cfg: RunConfig) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Benchmark every `name: (load, test split, pad id)` in this process on the same inputs, in
    serving precision (`kdray.loop.serving_precision`), throughput and latency alike.

    One model after another: load (peak memory counts load and inference: CUDA max allocated
    on GPU, peak RSS growth on CPU, above what was in use before), warm-up (`kdray.shapes.warm`),
    and one pass over the whole test split at `throughput_batch_size` (throughput; its logits are
    returned). Then latency: `latency_runs` batch-1 passes over the first test examples, every
    model in turn on each example, so slow drifts of the machine (other processes, clocks)
    hit every model alike rather than whichever ran during them.
    """
    import torch

    from kdray.loop import DeviceSplit, autocast_for, predict_logits, serving_precision
    from kdray.shapes import interleaved_latency, single_inputs, warm

    fc = cfg.final
    precision = serving_precision(device)
    autocast = autocast_for(device, precision)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    models, out, logits = {}, {}, {}
    with torch.inference_mode():
        for name, (load, split, pad) in loaders.items():
            base = _memory_mark(device)
            model = load().to(device).eval()
            resident = DeviceSplit(split, pad, device)
            singles = single_inputs(split, pad, device, fc.latency_runs)
            warm({name: (model, singles)}, fc.warmup_runs, device, autocast)
            if device.type == "cuda":  # every batch shape of the throughput pass, once
                predict_logits(model, resident, fc.throughput_batch_size, pad, device, precision=precision)
            sync()
            t0 = time.perf_counter()
            logits[name] = predict_logits(model, resident, fc.throughput_batch_size, pad, device, precision=precision)
            sync()
            seconds = time.perf_counter() - t0
            peak, kind = _memory_peak(device, base)
            out[name] = {"total_params": total_params(model), "size_mb": weights_mb(model),
                         "throughput_per_s": len(split) / seconds, "throughput_batch_size": fc.throughput_batch_size,
                         "peak_memory_mb": float(peak), "memory_kind": kind, "precision": precision}
            models[name] = (model, singles)
    times = interleaved_latency(models, fc.latency_runs, sync, autocast)
    for name, t in times.items():
        ms = np.asarray(t)
        out[name].update({"latency_ms_p50": float(np.percentile(ms, 50)), "latency_ms_p95": float(np.percentile(ms, 95)),
                          "latency_runs": len(ms)})
    return out, logits


def truncation_stats(split: Any, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """How much of `split`'s texts `max_length` keeps (the tokenizer truncates the tail away)."""
    pair = "text_pair" in split.column_names
    enc = tokenizer(list(split["text"]), list(split["text_pair"]) if pair else None, truncation=False)
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    return {"max_length": max_length, "truncation": "head (the first max_length tokens are kept)",
            "truncated_share": float((lengths > max_length).mean()), "median_tokens": float(np.median(lengths))}


def split_scores(logits: np.ndarray, labels: np.ndarray, k: int) -> dict[str, Any]:
    pred = logits.argmax(-1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return {**M.classification_metrics(cm, "test"), "confusion": cm.tolist()}


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for a single seed) over seeds."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else None, "values": a.tolist()}


# ----------------------------------------------------------------------------- error analysis

NEGATION = re.compile(r"\b(?:not|no|never|nor|neither|nobody|nothing|none|nowhere|without|hardly|barely|cannot)\b"
                      r"|n't\b", re.IGNORECASE)


def error_analysis(texts: list[str], labels: np.ndarray, pred: np.ndarray, prob: np.ndarray,
                   teacher_pred: np.ndarray, label_names: list[str], per_bucket: int) -> dict[str, Any]:
    """The student's test mistakes in buckets: short and long texts (word-count quartiles),
    with and without negation, and each true -> predicted class pair. Each bucket gives its
    examples, the student's errors and error rate, the teacher's error rate on the same
    examples, and the student's most confident mistakes in it."""
    words = np.array([len(t.split()) for t in texts])
    short, long_ = int(np.percentile(words, 25)), int(np.percentile(words, 75))
    negated = np.array([bool(NEGATION.search(t)) for t in texts])
    wrong = pred != labels
    buckets = [(f"short (<= {short} words)", words <= short), (f"long (>= {long_} words)", words >= long_),
               ("contains negation", negated), ("no negation", ~negated)]
    rows = []
    for name, mask in buckets:
        rows.append(_bucket(name, mask, wrong, teacher_pred != labels, texts, labels, pred, prob, label_names,
                            per_bucket))
    for a, true_name in enumerate(label_names):
        for b, pred_name in enumerate(label_names):
            if a == b:
                continue
            mask = labels == a
            errors = mask & (pred == b)
            row = _bucket(f"{true_name} -> {pred_name}", mask, errors, mask & (teacher_pred == b), texts, labels,
                          pred, prob, label_names, per_bucket)
            rows.append(row)
    return {"test_examples": len(texts), "errors": int(wrong.sum()), "error_rate": float(wrong.mean()),
            "teacher_errors": int((teacher_pred != labels).sum()), "buckets": rows,
            "negation_pattern": NEGATION.pattern}


def _bucket(name: str, mask: np.ndarray, errors: np.ndarray, teacher_errors: np.ndarray, texts: list[str],
            labels: np.ndarray, pred: np.ndarray, prob: np.ndarray, label_names: list[str],
            per_bucket: int) -> dict[str, Any]:
    """A bucket's counts; rates are errors among the bucket's examples (for a class pair: among
    the examples of the true class)."""
    n = int(mask.sum())
    err = mask & errors
    idx = np.flatnonzero(err)
    idx = idx[np.argsort(-prob[idx], kind="stable")][:per_bucket]  # most confident mistakes first
    return {"bucket": name, "examples": n, "errors": int(err.sum()),
            "error_rate": float(err.sum() / n) if n else None,
            "teacher_error_rate": float((mask & teacher_errors).sum() / n) if n else None,
            "shown": [{"text": texts[i][:300], "label": label_names[labels[i]], "predicted": label_names[pred[i]],
                       "probability": float(prob[i])} for i in idx]}


# ----------------------------------------------------------------------------- the stage


def score_runs(trained: list[tuple[TrialConfig, str]], job: Any, test: Any, device: torch.device, k: int,
               batch_size: int, base: Any = None) -> tuple[dict[str, list[dict]], dict[str, tuple[TrialConfig, str]]]:
    """Every retrained model's validation history and test scores, per variant, and the run of
    each variant with the best last-epoch validation accuracy (chosen on validation, never test).
    `base`: the weights the students started from (`load_trained`)."""
    from kdray.loop import predict_logits, serving_precision

    runs: dict[str, list[dict]] = {}
    chosen: dict[str, tuple[TrialConfig, str]] = {}
    best_val: dict[str, float] = {}
    for case, path in trained:
        model, history = load_trained(job, case, path, base)
        logits = predict_logits(model.to(device), test, batch_size, job.pad_token_id, device,
                                precision=serving_precision(device))
        v = case.variant
        row = {"seed": case.seed, M.TRAINABLE_PARAMS: case.trainable_params,
               M.VAL_ACCURACY: history[-1][M.VAL_ACCURACY], M.VAL_F1: history[-1][M.VAL_F1],
               "val_accuracy_per_epoch": [h[M.VAL_ACCURACY] for h in history], **split_scores(logits, test.labels, k)}
        runs.setdefault(v, []).append(row)
        if v not in chosen or row[M.VAL_ACCURACY] > best_val[v]:
            chosen[v], best_val[v] = (case, path), row[M.VAL_ACCURACY]
    return {v: runs[v] for v in VARIANTS if v in runs}, chosen


def save_student(unmerged: nn.Module, tokenizer: Any, run: RunDir, cfg: RunConfig, case: TrialConfig,
                 label_names: list[str]) -> Path:
    """Save the PEFT adapter (`final/adapter/`), then merge the LoRA weights and save the student
    as a plain Hugging Face classifier with its tokenizer (`final/student/`)."""
    unmerged.save_pretrained(run.adapter)
    merged = unmerged.merge_and_unload()
    student_dir = run.student
    merged.save_pretrained(student_dir, safe_serialization=True)
    tokenizer.save_pretrained(student_dir)
    (student_dir / "kdray.json").write_text(json.dumps({
        "run": cfg.name, "seed": case.seed, M.TRAINABLE_PARAMS: case.trainable_params,
        "label_names": label_names, "max_length": cfg.data.max_length}, indent=2))
    return student_dir


@dataclasses.dataclass
class FinalResult:
    final_dir: Path
    record: dict[str, Any]
    """What `final/final.json` holds."""


def run_final(cfg: RunConfig, task: Any, run: RunDir, teacher: Any, inputs: tuple[Any, Any], plan: Any,
              best: dict[str, Any], *, seeds: int | None = None) -> FinalResult:
    """Retrain, select on validation, save the merged student, score on test, benchmark.

    `teacher` is the teacher stage's `TeacherResult`, `inputs` the distillation inputs `(job,
    data)` the search trained on, `plan` the students' `kdray.resources.Plan`, `best` the
    search's choice. Ray must be running (`kdray.cluster.start`)."""
    t_start = time.perf_counter()
    seeds = seeds if seeds is not None else cfg.final.seeds
    if run.final.exists():
        print(f"final: replacing the earlier final stage in {run.final}")
        shutil.rmtree(run.final)
    run.final.mkdir(parents=True)
    job, data = inputs
    t0 = time.perf_counter()
    trained, reused = _retrain(cfg, task, run, job, data, plan, best, seeds)
    train_seconds = time.perf_counter() - t0
    test = task.read_test("final")  # the test split is read here and nowhere else
    measured, where, s_test, t_test = _measure(cfg, task, test, teacher, job, data, plan, trained)
    s_tok = _tokenizer(cfg.student)
    case, path = measured.chosen["student"]
    student_dir = save_student(load_trained(job, case, path, data.student_base)[0], s_tok, run, cfg, case,
                               task.label_names)
    errors = _errors_and_predictions(cfg, task, test, s_test, t_test, measured, run)
    record = {
        "seeds": seeds, "device": where["device_name"], "device_type": where["device_type"],
        "placement": where, "reused_search_trial": best["trial_id"] if reused else None,
        "train_seconds": train_seconds, "seconds": time.perf_counter() - t_start,
        "data": {"description": task.description, "label_names": task.label_names,
                 "sizes": {**{name: len(df) for name, df in task.splits.items()}, "test": len(test),
                           **({"transfer": len(task.transfer)} if task.transfer is not None else {})},
                 "test_reads": list(task.test_reads), **truncation_stats(test, s_tok, cfg.data.max_length)},
        "teacher": {"val": {kk: teacher.record[kk] for kk in (M.VAL_ACCURACY, M.VAL_F1)},
                    **split_scores(measured.logits["teacher"], t_test.labels, task.num_labels),
                    "model": teacher.record.get("model"), "epochs": teacher.record.get("epochs"),
                    "train_examples": teacher.record.get("train_examples")},
        "variants": {v: {"description": VARIANTS[v], M.TRAINABLE_PARAMS: rs[0][M.TRAINABLE_PARAMS],
                         "chosen_seed": measured.chosen[v][0].seed, "runs": rs,
                         **{key: mean_std([r[key] for r in rs]) for key in
                            (M.VAL_ACCURACY, M.TEST_ACCURACY, M.TEST_F1, M.TEST_PRECISION, M.TEST_RECALL)}}
                     for v, rs in measured.runs.items()},
        "benchmark": measured.benchmark,
        "merge_max_abs_logit_diff": measured.merge_diff,
        "error_analysis": errors,
        "student_dir": str(student_dir), "adapter_dir": str(run.adapter),
    }
    run.final_json.write_text(json.dumps(record, indent=2))
    print(f"final: done in {record['seconds']:.0f}s; merged vs unmerged logits differ by at most "
          f"{measured.merge_diff:.2e}; student saved to {student_dir}")
    return FinalResult(run.final, record)


def _retrain(cfg: RunConfig, task: Any, run: RunDir, job: Any, data: Any, plan: Any, best: dict[str, Any],
             seeds: int) -> tuple[list[tuple[TrialConfig, str]], bool]:
    """Every final run `(case, checkpoint)`, and whether the student's own-seed run is the
    search's chosen trial (not retrained: it would repeat it)."""
    from kdray.cluster import storage_join, storage_root

    cases = final_cases(cfg, best, task.num_labels, seeds)
    reused = []
    searched = search_checkpoint(run, best)
    if searched is not None:
        case = next(c for c in cases if c.variant == "student" and c.seed == cfg.seed)
        cases.remove(case)
        reused.append((case, searched))
        print(f"final: the student's seed {cfg.seed} run is the search's trial {best['trial_id']} (same configuration "
              f"and seed: a retrain would repeat it)")
    print(f"final: retraining the best configuration with {seeds} seed(s)"
          f"{' beside the no-KD and head-only baselines' if cfg.final.baselines else ''}: {len(cases)} runs")
    storage = storage_join(storage_root(cfg, run.root), run.final.name)
    return reused + (train_cases(cfg, job, data, cases, storage, plan) if cases else []), bool(reused)


def _tokenizer(spec: Any) -> Any:
    from kdray.models import load_tokenizer

    return load_tokenizer(spec)


def _measure(cfg: RunConfig, task: Any, test: Any, teacher: Any, job: Any, data: Any, plan: Any,
             trained: list[tuple[TrialConfig, str]]) -> tuple[Measured, dict[str, Any], Any, Any]:
    """Score and benchmark on the students' kind of device (`measure_models` in a Ray task)."""
    from kdray.data import tokenize
    from kdray.loop import Split
    from kdray.models import from_pretrained_dir, to_payload
    from kdray.tasks import on_device

    s_tok, t_tok = _tokenizer(cfg.student), _tokenizer(cfg.teacher)
    s_test, t_test = (Split.from_dataset(tokenize(task, tok, cfg.data.max_length, cfg.cache_dir, test=test)[0]["test"])
                      for tok in (s_tok, t_tok))
    print(f"final: scoring and benchmarking on {'a GPU' if plan.on_gpu else 'CPUs'} of the cluster: {len(s_test)} test "
          f"examples, batch 1 x {cfg.final.latency_runs} and batch {cfg.final.throughput_batch_size}")
    measured, where = on_device(plan, measure_models, job, data.student_base, trained, s_test, t_test,
                                to_payload(from_pretrained_dir(teacher.model_dir)), t_tok.pad_token_id, cfg)
    print(f"final: measured on {where['device_name']}")
    for name, b in measured.benchmark.items():
        b["description"] = BENCHMARKED[name]
        print(f"  {name:<17} p50 {b['latency_ms_p50']:7.2f} ms  p95 {b['latency_ms_p95']:7.2f} ms"
              f"  {b['throughput_per_s']:8.1f}/s  {b['size_mb']:7.1f} MB  peak memory {b['peak_memory_mb']:.0f} MB")
    return measured, where, s_test, t_test


def _errors_and_predictions(cfg: RunConfig, task: Any, test: Any, s_test: Any, t_test: Any, measured: Measured,
                            run: RunDir) -> dict[str, Any]:
    """The shipped student's error analysis, and `final/predictions.parquet`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    s_logits, t_logits = measured.logits["student"], measured.logits["teacher"]
    s_prob = torch.softmax(torch.tensor(s_logits), -1).numpy().max(-1)
    s_pred, t_pred = s_logits.argmax(-1), t_logits.argmax(-1)
    texts = list(test["text"])
    errors = error_analysis(texts, s_test.labels, s_pred, s_prob, t_pred, task.label_names,
                            cfg.final.examples_per_bucket)
    pq.write_table(pa.table({"example_id": s_test.example_ids, "text": texts, "label": s_test.labels,
                             "student_pred": s_pred, "student_prob": s_prob.astype(np.float32),
                             "teacher_pred": t_pred}), run.predictions)
    return errors


def _merged(model: nn.Module) -> nn.Module:
    """A trained model as it would ship: LoRA merged; a head-only model is already plain."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# ----------------------------------------------------------------------------- the command


def load_run(run: str | Path) -> tuple[RunConfig, Path]:
    """The resolved config of a finished search in `run`; exits 2 if it is not one."""
    from kdray.config import load_config

    rd = RunDir(Path(run).resolve())
    missing = [p.name for p in (rd.config, rd.best_config) if not p.is_file()]
    if missing:
        raise UserError(f"--run {run}: not a finished search (no {' or '.join(missing)}). Fix: pass a run "
                        f"directory written by `python -m kdray.search` (runs/<name>/).")
    return load_config(rd.config), rd.root


#: What `--help` shows as examples.
EXAMPLES = (
    'kdray final --run runs/default',
)


def build_parser() -> argparse.ArgumentParser:
    from kdray.cluster import add_cluster_arguments

    ap = argparse.ArgumentParser(
        prog="kdray final", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_epilog(*EXAMPLES),
        description=(
        "Rerun the final stage of a search: retrain the best configuration with several seeds and "
        "the no-KD and head-only baselines, save the merged student, benchmark everything against "
        "the teacher on the test split, and write results.json, report.md and plots/."))
    ap.add_argument("--run", required=True, help="run directory of a finished search (runs/<name>/)")
    ap.add_argument("--seeds", type=int, help="seeds per configuration (default: the run's final.seeds)")
    add_cluster_arguments(ap, workers=False)
    ap.add_argument("--wandb", choices=["online", "offline", "disabled"],
                    help="wandb mode of the final run (default: online with WANDB_API_KEY set, else offline)")
    return ap


if __name__ == "__main__":
    from kdray.errors import run_cli
    from kdray.pipeline import rerun_final

    run_cli(rerun_final)
