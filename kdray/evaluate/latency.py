"""Batch-1 latency of PyTorch models on their token ids: warm-up over every timed shape and
interleaved timing (the final stage's benchmark; the served forms' timing is `kdray.evaluate.serving`)."""

from __future__ import annotations

import time
from typing import Any


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
