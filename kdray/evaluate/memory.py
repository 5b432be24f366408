"""The memory one student trial holds on its GPU, part by part, and how many fit one GPU.

A Ray task holding one GPU (of each GPU type the trials can land on) builds the space's largest
student exactly as a trial does and runs what a trial runs: the splits it keeps on the device
(`kdray.train.batches.DeviceSplit`), the online teacher if any, one training step at the batch size on
the longest rows, AdamW's step (its state), and one evaluation pass at `eval_batch_size`. On a
CUDA device the allocator's own counters measure it, the reserve the caching allocator keeps
above what is allocated included, and the count is taken against the GPU's *free* memory (other
processes' use is not kdray's to take).

In a simulation (logical GPUs, `kdray.runtime.devices`) the same parts are counted on the CPU: the
tensors' own bytes, and for activations the bytes autograd saves for the backward pass. That is
an estimate of what CUDA would measure, named as one in the record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


#: Memory a CUDA process holds outside the allocator (context, kernels, cuBLAS workspaces). The
#: GPU check (`bench/gpu_check.py`) compares the total against `nvidia-smi`'s per-process use.
CUDA_CONTEXT_BYTES = 600 * 2**20
#: Keep this share of the free memory for fragmentation and spikes the probe does not see.
USABLE_SHARE = 0.9


@dataclass(frozen=True)
class TrialMemory:
    """Bytes one trial holds on its device, by part."""

    gpu_type: str
    weights: int
    """Every parameter and buffer of the student, the frozen base included."""
    resident_data: int
    """The training rows (and transfer set), validation rows and teacher logits kept on the device."""
    teacher: int
    """The online teacher's weights (0 with cached logits)."""
    optimizer: int
    """AdamW's state and the gradients of the trainable parameters."""
    step: int
    """Activations of one training step at the batch size on the longest rows (or of evaluation
    at `eval_batch_size`, whichever is larger)."""
    reserve: int
    """What the caching allocator holds above its allocated peak, plus the CUDA context."""
    free: int
    """The device's free memory when measured."""
    total_device: int
    measured: str
    """`cuda` (the allocator's counters) or `estimate` (a simulation: counted on the CPU)."""

    @property
    def per_trial(self) -> int:
        return self.weights + self.resident_data + self.teacher + self.optimizer + self.step + self.reserve

    def fits(self, cap: int) -> int:
        """How many such trials fit the free memory, at least 1, at most `cap`."""
        return max(1, min(cap, int(USABLE_SHARE * self.free // max(1, self.per_trial))))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_trial": self.per_trial}

    def line(self) -> str:
        mib = lambda b: f"{b / 2**20:,.0f}"
        return (f"{self.gpu_type}: one trial holds {mib(self.per_trial)} MiB (weights {mib(self.weights)}, data "
                f"{mib(self.resident_data)}, teacher {mib(self.teacher)}, optimizer {mib(self.optimizer)}, step "
                f"{mib(self.step)}, allocator reserve and context {mib(self.reserve)}) of {mib(self.free)} MiB free"
                f"{' (a simulation: estimated on the CPU)' if self.measured == 'estimate' else ''}")


def measure(job: Any, data: Any, device: Any, gpu_type: str, total_bytes: int | None = None) -> TrialMemory:
    """Run one trial's worth of work of `job` (`kdray.train.loop.DistillJob`) on `data`
    (`DistillData`) on `device` and count what it holds, phase by phase. `total_bytes`: the
    device's memory where torch cannot say (a simulated GPU)."""
    import numpy as np
    import torch

    from kdray.train.batches import DeviceSplit, model_inputs
    from kdray.train.loop import OnlineTeacher, make_optimizer
    from kdray.train.loss import kd_loss
    from kdray.train.models import build_student, from_payload
    from kdray.train.precision import autocast_for

    count = _CudaPhases(device) if device.type == "cuda" else _CpuPhases()
    model = build_student(job.model, job.num_labels, job.label_names, device="cpu", seed=job.seed,
                          base=data.student_base)
    weights, _ = count(lambda: [model.to(device)], "tensors")
    kd = job.train.alpha < 1.0
    cached = kd and job.train.teacher_logits != "online"
    rows = data.train if not kd or data.transfer is None else data.train.concat(data.transfer)
    resident, _ = count(lambda: [DeviceSplit(rows, job.pad_token_id, device, data.teacher_logits if cached else None),
                                 DeviceSplit(data.validation, job.pad_token_id, device)], "tensors")
    train, validation = count.last
    teacher_bytes, teacher = 0, None
    if kd and not cached:
        teacher_bytes, _ = count(lambda: [from_payload(data.teacher_model).to(device)], "tensors")
        teacher = OnlineTeacher(count.last[0])
    optimizer = make_optimizer(model, job.train, device)
    autocast = autocast_for(device, job.train.precision)
    longest = lambda split, n: np.argsort(-split.lengths, kind="stable")[: max(1, min(n, len(split)))]

    def train_step() -> list:
        model.train()
        batch = train.batch(longest(train, job.train.batch_size))
        with autocast:
            t_logits = teacher(batch) if teacher is not None else batch.get("teacher_logits")
            logits = model(**model_inputs(batch)).logits
        kd_loss(logits, batch["labels"], t_logits, 0.5 if kd else 1.0, 2.0)[0].backward()
        return [p.grad for p in model.parameters() if p.grad is not None]

    grads, activations = count(train_step, "tensors", saved=True)
    state, _ = count(lambda: (optimizer.step(), [v for s in optimizer.state.values() for v in s.values()])[1], "tensors")

    def evaluation() -> list:
        model.eval()
        with torch.no_grad(), autocast:
            model(**model_inputs(validation.batch(longest(validation, job.train.eval_batch_size))))
        return []

    _, eval_peak = count(evaluation, "tensors", outputs=True)
    free, total = count.free_total(total_bytes)
    return TrialMemory(gpu_type, weights, resident, teacher_bytes, grads + state, max(activations, eval_peak),
                       count.reserve(), free, total, "cuda" if device.type == "cuda" else "estimate")


class _CudaPhases:
    """`count(phase)` -> (bytes the phase left allocated, its peak above that), from the CUDA
    allocator's counters."""

    def __init__(self, device: Any):
        import torch

        self.torch, self.device, self.last = torch, device, None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def __call__(self, phase: Any, _kind: str, saved: bool = False, outputs: bool = False) -> tuple[int, int]:
        cuda = self.torch.cuda
        cuda.synchronize(self.device)
        before = cuda.memory_allocated(self.device)
        cuda.reset_peak_memory_stats(self.device)
        self.last = phase()
        cuda.synchronize(self.device)
        after = cuda.memory_allocated(self.device)
        return after - before, max(0, cuda.max_memory_allocated(self.device) - after)

    def reserve(self) -> int:
        stats = self.torch.cuda.memory_stats(self.device)
        return max(0, stats.get("reserved_bytes.all.current", 0) - stats.get("allocated_bytes.all.current", 0)) \
            + CUDA_CONTEXT_BYTES

    def free_total(self, _total: int | None) -> tuple[int, int]:
        free, total = self.torch.cuda.mem_get_info(self.device)
        # What this probe holds is free to the trials that follow it (the probe ends first).
        return free + self.torch.cuda.memory_reserved(self.device), total


class _CpuPhases:
    """The same phases counted on the CPU: the bytes of the tensors a phase returns, autograd's
    saved tensors for a training step's activations (what backward keeps alive), and 4x the
    largest module output for an evaluation pass (input, output, attention scores and softmax
    alive at once)."""

    def __init__(self) -> None:
        self.last = None

    def __call__(self, phase: Any, _kind: str, saved: bool = False, outputs: bool = False) -> tuple[int, int]:
        import torch

        peak = [0]
        seen: set[int] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in seen and not isinstance(t, torch.nn.Parameter):  # weights count once
                seen.add(t.data_ptr())
                peak[0] += t.numel() * t.element_size()
            return t

        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            t = output[0] if isinstance(output, tuple) else getattr(output, "logits", output)
            if isinstance(t, torch.Tensor):
                peak[0] = max(peak[0], 4 * t.numel() * t.element_size())

        handle = torch.nn.modules.module.register_module_forward_hook(hook) if outputs else None
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if saved else _nothing():
                self.last = phase()
        finally:
            if handle is not None:
                handle.remove()
        return _tensor_bytes(self.last), peak[0]

    def reserve(self) -> int:
        return 0

    def free_total(self, total: int | None) -> tuple[int, int]:
        total = int(total or 0)
        return total, total


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _tensor_bytes(objs: list) -> int:
    """Bytes of the distinct tensors in `objs`: tensors, modules (parameters and buffers), or
    objects holding tensors as attributes (a `DeviceSplit`)."""
    import torch

    tensors: dict[int, torch.Tensor] = {}
    for item in objs or []:
        if isinstance(item, torch.Tensor):
            found = [item]
        elif isinstance(item, torch.nn.Module):
            found = [*item.parameters(), *item.buffers()]
        else:
            found = [v for v in vars(item).values() if isinstance(v, torch.Tensor)]
        for t in found:
            tensors.setdefault(t.data_ptr(), t)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def from_dict(d: dict[str, Any]) -> TrialMemory:
    fields = TrialMemory.__dataclass_fields__
    return TrialMemory(**{k: v for k, v in d.items() if k in fields})
