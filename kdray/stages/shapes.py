"""Student shapes: the depths a search chooses from, how fast each one is, and which are allowed.

A shape is a `student.keep_layers` (which layers of the model the student keeps, in order).
`space.keep_layers` lists candidates; without it the student's own shape is the only one. Before
the search, each shape's batch-1 latency (p50, tokenization included) is measured once in the form
the student will be served in (`serve.runtime`: PyTorch, ONNX Runtime fp32 or int8) on the device
the final stage benchmarks on, beside the teacher's in the same form, and cached (it depends on
the shape, the form, the inputs and the machine, not on the weights: a merged LoRA student runs
exactly like a plain model of its shape).
`search.latency_budget_ms` and `search.min_speedup` then mark the slow shapes; the search's
sampler is told about a sample of one exactly as about an over-budget sample (`kdray.stages.search`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from kdray.cache import cached_dir, fingerprint
from kdray.config import RunConfig, origin_of, student_shapes, to_dict
from kdray.errors import UserError
from kdray.machine import package_version
from kdray.evaluate.serving import time_shapes
from kdray.train.budget import rank_limit
from kdray.trials import shape_text


@dataclass(frozen=True)
class Shape:
    """One candidate student shape, measured."""

    keep_layers: list[int] | None
    """The layers kept; None: the student as configured (every layer, or its own keep_layers)."""
    latency_ms: float
    """p50 latency of one example (batch 1) on the benchmark device."""
    params: tuple[int, int]
    """Fewest and most trainable parameters over the space's LoRA choices (every layer adapted)."""
    fits: bool = True
    """Within the latency budget (always true without one)."""

    @property
    def text(self) -> str | None:
        return shape_text(self.keep_layers)


@dataclass(frozen=True)
class ShapeTable:
    """The measured candidates, the teacher's latency beside them, and where it was measured."""

    shapes: list[Shape]
    teacher_ms: float
    device: str
    cached: bool

    def latency_of(self) -> dict[str | None, float]:
        """`{shape text: latency ms}`: plain data for the (pickled) search space."""
        return {s.text: s.latency_ms for s in self.shapes}

    limit_ms: float | None = None
    """The slowest batch-1 latency allowed (the latency budget, or the teacher's over the speed-up)."""
    runtime: str = "pytorch"
    """Where the latencies were measured: `serve.runtime`, the form the student will be served in."""


def measure(cfg: RunConfig, task: Any, plan: Any = None) -> ShapeTable:
    """Each candidate's and the teacher's batch-1 p50 latency (cached), the trainable-parameter
    range of each candidate, and which fit the latency budget. A `UserError` when none does.

    Timed by a Ray task on the students' kind of device (`plan`: their `kdray.runtime.resources.Plan`;
    without one, planned on the running Ray), where the final stage benchmarks too."""
    import torch

    from kdray.runtime.tasks import on_device

    plan = plan or _students_plan(cfg)
    shapes = student_shapes(cfg)
    # What decides the speed: each model's identity and shape, the inputs, the machine (not LoRA, not training).
    models = [{k: to_dict(m)[k] for k in ("name", "config", "tokenizer")} for m in (cfg.student, cfg.teacher)]
    key = fingerprint("latency-v3", models, cfg.teacher.keep_layers, [shape_text(s) for s in shapes],
                      task.fingerprint, cfg.data.max_length, cfg.final.latency_runs, cfg.final.warmup_runs,
                      _device_key(plan), torch.__version__, cfg.serve.runtime, package_version("onnxruntime"))

    def build(tmp) -> None:
        ms, where = on_device(plan, time_shapes, cfg, task.num_labels, shapes, *_validation_texts(cfg, task))
        (tmp / "latency.json").write_text(json.dumps({**ms, "device": where["device_name"], "placement": where}))

    path, hit = cached_dir("latency", key, build, cfg.cache_dir)
    ms = json.loads((path / "latency.json").read_text())
    limit = _limit_ms(cfg, ms["teacher"])
    table = []
    for shape in shapes:
        latency = ms["shapes"][str(shape_text(shape))]
        table.append(Shape(shape, latency, _param_range(cfg, task.num_labels, shape), limit is None or latency <= limit))
    result = ShapeTable(table, ms["teacher"], ms["device"], hit, limit, ms["runtime"])
    if not any(s.fits for s in table):
        field = "search.latency_budget_ms" if cfg.search.latency_budget_ms is not None else "search.min_speedup"
        measured = ", ".join(f"{s.text or 'as configured'}: {s.latency_ms:.2f} ms" for s in table)
        raise UserError(f"{field}: no student shape is fast enough ({_budget_text(cfg)}; measured at batch 1 on "
                        f"{result.device}: {measured}; teacher {result.teacher_ms:.2f} ms). Fix: a looser "
                        f"--latency-budget, or shallower shapes in space.keep_layers.", where=origin_of(cfg, field))
    return result


def _students_plan(cfg: RunConfig) -> Any:
    from kdray.runtime.cluster import init_ray
    from kdray.runtime.resources import plan_run, read_view

    init_ray()
    return plan_run(cfg, read_view()).students


def _device_key(plan: Any) -> str:
    """What the timing depends on about the machine, known before the task runs: the GPU kinds,
    or this machine's CPU model and the threads a CPU task holds."""
    if plan.on_gpu:
        from kdray.runtime.devices import simulated

        return f"gpu{' (simulated)' if simulated() else ''}"
    import platform

    return f"cpu x{plan.node_cpus:g} {platform.processor() or platform.machine()}"


def _limit_ms(cfg: RunConfig, teacher_ms: float) -> float | None:
    se = cfg.search
    limits = [se.latency_budget_ms] if se.latency_budget_ms is not None else []
    limits += [teacher_ms / se.min_speedup] if se.min_speedup is not None else []
    return min(limits) if limits else None


def _budget_text(cfg: RunConfig) -> str:
    se = cfg.search
    parts = [f"at most {se.latency_budget_ms:g} ms"] if se.latency_budget_ms is not None else []
    parts += [f"at least {se.min_speedup:g}x faster than the teacher"] if se.min_speedup is not None else []
    return " and ".join(parts)


def _param_range(cfg: RunConfig, num_labels: int, shape: list[int] | None) -> tuple[int, int]:
    student = dataclasses.replace(cfg.student, keep_layers=shape)
    counts = []
    for modules in cfg.space.target_modules:
        law = rank_limit(student, num_labels, modules, None)
        counts += [law.at(min(cfg.space.lora_r)), law.at(max(cfg.space.lora_r))]
    return min(counts), max(counts)


def _validation_texts(cfg: RunConfig, task: Any) -> tuple[list, str, str]:
    """The first validation texts (as many as are timed) and the student's and the teacher's
    tokenizers (`tokenizer.json`, what a served form tokenizes with)."""
    from kdray.data.load import split_texts
    from kdray.train.models import load_tokenizer

    val = task.splits["validation"].select(range(min(cfg.final.latency_runs, len(task.splits["validation"]))))
    texts = split_texts(val)
    return (texts, *(load_tokenizer(spec).backend_tokenizer.to_str() for spec in (cfg.student, cfg.teacher)))


def describe_shapes(table: ShapeTable, cfg: RunConfig) -> None:
    """Print each candidate: layers, batch-1 latency, speed-up over the teacher, parameter range."""
    budget = f"; latency budget {_budget_text(cfg)}" if cfg.search.latency_budget_ms or cfg.search.min_speedup else ""
    print(f"student shapes: batch-1 p50 in {table.runtime} (serve.runtime), tokenization included, on {table.device} "
          f"({'cached' if table.cached else 'measured now'}): "
          f"teacher {table.teacher_ms:.2f} ms{budget}")
    for s in table.shapes:
        layers = "as configured" if s.keep_layers is None else f"layers {s.text}"
        print(f"  {layers:<22} {s.latency_ms:7.2f} ms  {table.teacher_ms / s.latency_ms:5.2f}x  "
              f"trainable {s.params[0]:,}-{s.params[1]:,}{'' if s.fits else '  too slow: never trains'}")
