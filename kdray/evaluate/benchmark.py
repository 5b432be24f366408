"""The benchmark: every model's latency at batch 1, throughput, size and peak memory on the same
test inputs, in serving precision; and each retrained run's test scores."""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdray import metrics as M
from kdray.config import RunConfig
from kdray.evaluate.scores import split_scores
from kdray.trials import VARIANTS, TrialConfig


if TYPE_CHECKING:  # torch loads when the stage runs, so `kdray final --run BAD` answers at once
    import torch
    from torch import nn


#: What the benchmark table shows, in order: name -> description.
BENCHMARKED = {
    "teacher": "fine-tuned teacher",
    "student": "student, LoRA merged (final/student)",
    "student_unmerged": "student, LoRA unmerged (PEFT)",
    "no_kd": VARIANTS["no_kd"] + ", merged",
    "head_only": VARIANTS["head_only"],
}


def load_trained(job: Any, case: TrialConfig, checkpoint_dir: str | Path, base: Any = None) -> tuple[nn.Module, list[dict]]:
    """Rebuild a case's model exactly as its trial did (from `base`, the `DistillData.student_base`
    it started from, when set) and load its trained weights from a local checkpoint directory (a
    checkpoint holds those only)."""
    from kdray.train.checkpoint import load_checkpoint
    from kdray.train.models import build_student

    j = case.job(job)
    model = build_student(j.model, j.num_labels, j.label_names, seed=j.seed, base=base)
    _, history = load_checkpoint(Path(checkpoint_dir), model)
    return model.eval(), history


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


def memory_mark(device: torch.device) -> float:
    """Start a peak-memory window; returns the baseline (MB) that `memory_peak` subtracts."""
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


def memory_peak(device: torch.device, base: float) -> tuple[float, str]:
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


def measure_models(device: torch.device, job: Any, base: Any, trained: list[tuple[TrialConfig, Path]],
                   s_test: Any, t_test: Any, teacher: dict, t_pad: int, cfg: RunConfig) -> Measured:
    """The final stage's measuring, on the students' kind of device (the stage runs it in a Ray
    task there; `trained`: each run's local checkpoint directory): every retrained model's test
    scores, then the benchmark of the
    teacher (`teacher`: a `to_payload`), the shipped student merged and unmerged, and the
    baselines, on the same test inputs. `base`: the weights the students started from."""
    from kdray.train.loop import predict_logits
    from kdray.train.models import from_payload, merged
    from kdray.train.precision import serving_precision

    runs, chosen = score_runs(trained, job, s_test, device, len(job.label_names), cfg.final.throughput_batch_size,
                              base)
    case, path = chosen["student"]
    loaders = {
        "teacher": (lambda: from_payload(teacher), t_test, t_pad),
        "student": (lambda: merged(load_trained(job, case, path, base)[0]), s_test, job.pad_token_id),
        "student_unmerged": (lambda: load_trained(job, case, path, base)[0], s_test, job.pad_token_id),
    }
    for v in ("no_kd", "head_only"):
        if v in chosen:
            loaders[v] = (lambda v=v: merged(load_trained(job, *chosen[v], base)[0]), s_test, job.pad_token_id)
    bench, logits = benchmark(loaders, device, cfg)
    as_merged, as_unmerged = logits["student"], logits["student_unmerged"]
    if serving_precision(device) != "fp32":  # the timed passes ran under autocast: compare the weights in fp32
        as_merged, as_unmerged = (predict_logits(loaders[name][0]().to(device), s_test, cfg.final.throughput_batch_size,
                                           job.pad_token_id, device, precision="fp32")
                            for name in ("student", "student_unmerged"))
    return Measured(runs, chosen, bench, logits, float(np.abs(as_merged - as_unmerged).max()))


def benchmark(loaders: dict[str, tuple[Any, Any, int]], device: torch.device,
              cfg: RunConfig) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Benchmark every `name: (load, test split, pad id)` in this process on the same inputs, in
    serving precision (`kdray.train.precision.serving_precision`), throughput and latency alike.

    One model after another: load (peak memory counts load and inference: CUDA max allocated
    on GPU, peak RSS growth on CPU, above what was in use before), warm-up (`kdray.evaluate.latency.warm`),
    and one pass over the whole test split at `throughput_batch_size` (throughput; its logits are
    returned). Then latency: `latency_runs` batch-1 passes over the first test examples, every
    model in turn on each example, so slow drifts of the machine (other processes, clocks)
    hit every model alike rather than whichever ran during them.
    """
    import torch

    from kdray.evaluate.latency import interleaved_latency, single_inputs, warm
    from kdray.train.batches import DeviceSplit
    from kdray.train.loop import predict_logits
    from kdray.train.precision import autocast_for, serving_precision

    fc = cfg.final
    precision = serving_precision(device)
    autocast = autocast_for(device, precision)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    models, out, logits = {}, {}, {}
    with torch.inference_mode():
        for name, (load, split, pad) in loaders.items():
            base = memory_mark(device)
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
            peak, kind = memory_peak(device, base)
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


def score_runs(trained: list[tuple[TrialConfig, str]], job: Any, test: Any, device: torch.device, k: int,
               batch_size: int, base: Any = None) -> tuple[dict[str, list[dict]], dict[str, tuple[TrialConfig, str]]]:
    """Every retrained model's validation history and test scores, per variant, and the run of
    each variant with the best last-epoch validation accuracy (chosen on validation, never test).
    `base`: the weights the students started from (`load_trained`)."""
    from kdray.train.loop import predict_logits
    from kdray.train.precision import serving_precision

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
               "val_accuracy_per_epoch": [h[M.VAL_ACCURACY] for h in history],
               "train_loss_per_epoch": [h[M.TRAIN_LOSS] for h in history], **split_scores(logits, test.labels, k)}
        runs.setdefault(v, []).append(row)
        if v not in chosen or row[M.VAL_ACCURACY] > best_val[v]:
            chosen[v], best_val[v] = (case, path), row[M.VAL_ACCURACY]
    return {v: runs[v] for v in VARIANTS if v in runs}, chosen
