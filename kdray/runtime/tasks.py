"""Measuring work runs where the trials run: a Ray task holding the device it measures.

The driver of a cluster run sits on the head, which has no GPU in the shipped layouts
(`launch/`). Work that must run on the trials' device (the memory probe, the student shapes'
latencies, the teacher's logits on a transfer set, the final stage's test scores and benchmark)
goes to a Ray task that holds what one trial of the role holds: one whole GPU of the plan's kind,
or on CPUs every CPU of one node (a measurement wants the node to itself; on one machine that is
what the driver had). The task computes on `kdray.runtime.devices.assigned()` and returns where it ran,
so the report names the device that was measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kdray.runtime.resources import Plan


def on_device(plan: Plan, fn: Callable[..., Any], *args: Any, gpu_type: str | None = None,
              **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """`fn(device, *args, **kwargs)` in a Ray task on `plan`'s kind of device; returns its result
    and the task's placement (node, GPU ids, device, and `device_name`)."""
    import ray

    if plan.on_gpu:
        options: dict[str, Any] = {"num_gpus": 1, "num_cpus": min(1.0, plan.resources.cpus_per_worker)}
        if gpu_type is not None:  # Ray's accelerator_type resource pins a GPU kind
            options["resources"] = {f"accelerator_type:{gpu_type}": 0.001}
    else:
        options = {"num_cpus": plan.node_cpus}
    return ray.get(ray.remote(**options)(_run).remote(fn, args, kwargs))


def _run(fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]]:
    import ray
    import torch

    from kdray.machine import device_name
    from kdray.runtime.devices import assigned, release_cached_memory

    where = assigned()
    device = where.torch_device()
    if device.type == "cpu":  # the threads the task holds (a reused worker may have started with others)
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    try:
        result = fn(device, *args, **kwargs)
    finally:
        release_cached_memory(device)
    return result, {**where.as_dict(), "device_type": device.type,
                    "device_name": device_name(device) + (" (a simulated GPU)" if where.simulated else "")}


def size_students(plan: Any, job: Any, data: Any, concurrency: int) -> Any:
    """The students' plan with their GPU share: the memory probe (`kdray.evaluate.memory`) runs `job`
    (the space's largest student) on `data` in a task on each kind of GPU that is up, and the
    trials spread over the GPUs (`kdray.runtime.resources.spread_students`). On CPUs, `plan` as it is."""
    import ray

    from kdray.evaluate.memory import from_dict
    from kdray.runtime.resources import MAX_STUDENTS_PER_GPU, read_view, spread_students

    if not plan.on_gpu or plan.resources.workers > 1:
        return plan
    view = read_view()
    data_ref = ray.put(data)
    fits, memory = {}, {}
    for gpu_type in [t for t in {n.gpu_type for n in view.nodes if n.gpus > 0}]:
        measured, where = on_device(plan, _probe, job, data_ref, gpu_type or "GPU", gpu_type=gpu_type)
        mem = from_dict(measured)
        fits[mem.gpu_type], memory[mem.gpu_type] = mem.fits(MAX_STUDENTS_PER_GPU), {**mem.as_dict(), "placement": where}
        print(f"memory: {mem.line()}", flush=True)
    return spread_students(plan, view, concurrency, fits, memory)


def _probe(device: Any, job: Any, data_ref: Any, gpu_type: str) -> dict[str, Any]:
    """The probe's task body (the data arrives as an object reference: fetched here, once)."""
    import ray

    from kdray.evaluate.memory import measure
    from kdray.runtime.devices import simulated_gpu_bytes

    data = ray.get(data_ref) if isinstance(data_ref, ray.ObjectRef) else data_ref
    return measure(job, data, device, gpu_type, None if device.type == "cuda" else simulated_gpu_bytes()).as_dict()
