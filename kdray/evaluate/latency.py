"""Batch-1 latency: warm-up over every timed shape, interleaved timing, and the student
shapes' timing a search's latency budget reads."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from kdray.config import RunConfig
from kdray.trials import shape_text


def interleaved_latency(models: dict[str, tuple[Any, list[dict]]], runs: int, sync: Any = None,
                        autocast: Any = None) -> dict[str, list[float]]:
    """Batch-1 latency in ms: `runs` timed forward passes per model over its own `inputs`, every
    model in turn on each example, so slow drifts of the machine (other processes, clocks) hit
    every model alike rather than whichever ran during them. `autocast`: the precision context
    the passes run under (the same as the throughput pass). Warm the models first (`warm`)."""
    import contextlib

    import torch

    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode(), (autocast if autocast is not None else contextlib.nullcontext()):
        for i in range(runs):
            for name, (model, inputs) in models.items():
                sync()
                t0 = time.perf_counter()
                model(**inputs[i % len(inputs)])
                sync()
                times[name].append((time.perf_counter() - t0) * 1000)
    return times


def single_inputs(split: Any, pad_id: int, device: Any, runs: int) -> list[dict]:
    """Batch-1 inputs of the first `runs` examples of `split` (cycled), on `device`."""
    import numpy as np

    from kdray.train.batches import DeviceSplit, model_inputs

    resident = DeviceSplit(split, pad_id, device)
    return [model_inputs(resident.batch(np.array([i % len(split)]))) for i in range(min(runs, len(split)))]


def warm(models: dict[str, tuple[Any, list[dict]]], warmup_runs: int, device: Any, autocast: Any) -> None:
    """Untimed passes before timing, in the timed passes' precision (`autocast`). On CUDA every
    timed input once: kernels are chosen and loaded per new shape, and a first pass at a new
    length costs many times a warm one, which would land on whichever model meets that length
    first. On a CPU `warmup_runs` passes."""
    import torch

    with torch.inference_mode(), autocast:
        for model, xs in models.values():
            for x in (xs if device.type == "cuda" else [xs[i % len(xs)] for i in range(warmup_runs)]):
                model(**x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _time_shapes(device: Any, cfg: RunConfig, num_labels: int, shapes: list[list[int] | None], student_split: Any,
                 student_pad: int, teacher_split: Any, teacher_pad: int) -> dict:
    """The task body: build each shape (and the teacher) with random weights (latency does not
    depend on them) on `device`, warm each, then time them round-robin on the first validation
    examples."""
    import numpy as np
    import torch

    from kdray.train.models import build_model

    runs = cfg.final.latency_runs
    student_inputs = single_inputs(student_split, student_pad, device, runs)
    models = {str(shape_text(s)): (build_model(dataclasses.replace(cfg.student, keep_layers=s), num_labels,
                                               device=device).eval(), student_inputs) for s in shapes}
    models["teacher"] = (build_model(cfg.teacher, num_labels, device=device).eval(),
                         single_inputs(teacher_split, teacher_pad, device, runs))
    from kdray.train.precision import autocast_for, serving_precision

    autocast = autocast_for(device, serving_precision(device))
    warm(models, cfg.final.warmup_runs, device, autocast)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    p50 = {name: float(np.percentile(t, 50)) for name, t in interleaved_latency(models, runs, sync, autocast).items()}
    return {"teacher": p50.pop("teacher"), "shapes": p50}
