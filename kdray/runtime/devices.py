"""Which device a Ray worker computes on: exactly the GPUs Ray gave it, else the CPU.

Every process kdray starts on Ray (a one-worker trial, a DDP rank, a task that measures) takes
its device from `assigned()`, never from `torch.cuda.is_available()`:

- **No GPU held, no CUDA.** Ray 2.60 no longer sets `CUDA_VISIBLE_DEVICES` for a task that
  holds zero GPUs (ray#54868), so torch sees every GPU of the node and Ray Train's local-mode
  `get_device()` answers `cuda:0` (ray/train/v2/torch/train_loop_utils.py). A CPU trial on a
  GPU node would then train on a GPU that Ray never reserved. `assigned()` hides the GPUs from
  such a process before CUDA starts.
- **GPUs held, CUDA required.** A process that holds GPUs but whose torch cannot use CUDA (a CPU
  build of torch, no driver) raises `DeviceError` at once with the fix, instead of training on
  the CPU while holding the GPU.

**Simulation.** `KDRAY_SIMULATE_GPUS` set in a process's environment turns on the one seam that
lets tests run GPU plans on a machine without GPUs: Ray's *logical* GPUs (`ray start
--num-gpus`, `ray.init(num_gpus=...)`) are scheduled and assigned exactly as real ones, and a
process holding them computes on the CPU, labelled `(simulated on cpu)` wherever it is shown.
It is refused on a machine whose torch can use CUDA, so no real run can fall into it. Its value
is the number of logical GPUs a local Ray started by kdray gets (a cluster's nodes say their own
with `--num-gpus`); `KDRAY_SIMULATE_GPU_MEMORY_GB` is each logical GPU's memory (default 16).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from kdray import metrics as M
from kdray.errors import UserError


SIMULATE_ENV = "KDRAY_SIMULATE_GPUS"
SIMULATED_MEMORY_ENV = "KDRAY_SIMULATE_GPU_MEMORY_GB"


#: The variables torchrun sets. A trial process that inherits them (kdray started under torchrun,
#: or from a shell that exported them) makes Ray Train's local mode call `init_process_group`
#: and wait forever for ranks that do not exist (local_mode/torch.py, `has_torchrun_env`).
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


class DeviceError(UserError):
    """A process holds GPUs it cannot use, or a simulation met real GPUs: the setup, not the
    data, is wrong. Reported like every user error: one message with the fix, exit status 2."""


def simulated() -> bool:
    """Whether this process runs in a simulated GPU cluster (`KDRAY_SIMULATE_GPUS`)."""
    return os.environ.get(SIMULATE_ENV, "") != ""


def simulated_local_gpus() -> int:
    """Logical GPUs of a local Ray kdray starts itself in a simulation (0 outside one)."""
    if not simulated():
        return 0
    try:
        return max(0, int(os.environ[SIMULATE_ENV]))
    except ValueError:
        raise UserError(f"{SIMULATE_ENV}={os.environ[SIMULATE_ENV]!r}: not a number of logical GPUs. Fix: "
                        f"unset it (a real run), or give a count, e.g. {SIMULATE_ENV}=2.") from None


def simulated_gpu_bytes() -> int:
    """The memory each logical GPU of a simulation has."""
    return int(float(os.environ.get(SIMULATED_MEMORY_ENV, "16")) * 2**30)


def refuse_simulation_on_real_gpus() -> None:
    """A simulation on a machine whose torch can use CUDA is a mistake: it would compute on the
    CPU while real GPUs sit idle."""
    if not simulated():
        return
    import torch

    if torch.cuda.is_available():
        raise DeviceError(f"{SIMULATE_ENV} is set on a machine whose torch can use CUDA: a simulated cluster "
                          f"computes on the CPU. Fix: unset {SIMULATE_ENV} (it is for tests on machines "
                          f"without GPUs).")


@dataclass(frozen=True)
class Placement:
    """Where one process of a trial or task runs: its Ray node, the GPU ids Ray gave it, and the
    torch device it computes on."""

    node_id: str
    gpu_ids: tuple[str, ...]
    """The GPU ids Ray assigned (`ray.get_runtime_context().get_accelerator_ids()`), physical
    indices on the node; empty for a process that holds no GPU."""
    device: str
    """`cpu`, `cuda:N`, or `cuda:N (simulated on cpu)`."""
    visible_devices: str | None = None
    """`CUDA_VISIBLE_DEVICES` as this process sees it ("" for one that holds no GPU)."""

    @property
    def simulated(self) -> bool:
        return self.device.endswith("(simulated on cpu)")

    def torch_device(self) -> Any:
        import torch

        return torch.device("cpu" if self.simulated else self.device)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gpu_ids": list(self.gpu_ids)}


def assigned() -> Placement:
    """The device of the calling Ray worker: `cuda` exactly when Ray gave it GPUs.

    A process that holds none gets `CUDA_VISIBLE_DEVICES=""` before CUDA starts, so nothing in it
    (torch, a library) can reach a GPU. One that holds GPUs computes on the first of them (Ray
    sets `CUDA_VISIBLE_DEVICES` to the ids it gave, and torch numbers them from 0 in that order).
    """
    import ray
    import torch

    node = ray.get_runtime_context().get_node_id()
    ids = tuple(str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
    if not ids:
        if not torch.cuda.is_initialized():
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return Placement(node, (), "cpu", os.environ.get("CUDA_VISIBLE_DEVICES"))
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    index = visible.index(ids[0]) if ids[0] in visible else 0
    if simulated():
        refuse_simulation_on_real_gpus()
        return Placement(node, ids, f"cuda:{index} (simulated on cpu)", os.environ.get("CUDA_VISIBLE_DEVICES"))
    if not torch.cuda.is_available():
        why = "torch here is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device (driver?)"
        raise DeviceError(f"this process holds GPU(s) {', '.join(ids)} on Ray node {node[:12]}, but cannot use "
                          f"CUDA: {why}. Fix: install a CUDA build of torch on the GPU nodes (pip install torch, "
                          f"the normal wheel), or run on CPUs: --set resources.device=cpu.")
    return Placement(node, ids, f"cuda:{index}", os.environ.get("CUDA_VISIBLE_DEVICES"))


def forget_torchrun_env() -> list[str]:
    """Drop torchrun's variables from this process (see `TORCHRUN_ENV`); returns those dropped."""
    dropped = [k for k in TORCHRUN_ENV if k in os.environ]
    for k in dropped:
        del os.environ[k]
    return dropped


def release_cached_memory(device: Any) -> None:
    """Give the CUDA allocator's cached blocks back to the GPU. A reused trial process (Tune's
    `reuse_actors`) keeps its last trial's reserve otherwise, and the next trial on the same GPU
    finds that much less free."""
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", None) == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class GpuBusy:
    """This process's own GPU's utilisation, sampled every `interval_s` by a background thread
    through NVML (`torch.cuda.utilization`, which maps the visible device to its physical GPU).
    Only the GPU this trial holds, on the node it runs on; nothing where there is no CUDA device
    (a CPU trial, a simulation) or NVML cannot say (no nvidia-ml-py; MIG slices report no
    utilisation): then `epoch()` says why once."""

    def __init__(self, device: Any, interval_s: float = 1.0):
        import threading

        self.samples: list[float] = []
        self.why: str | None = None
        self._stop = threading.Event()
        self._thread = None
        if getattr(device, "type", "cpu") != "cuda":
            return
        try:
            import torch

            torch.cuda.utilization(device)
        except Exception as e:  # no NVML, MIG: no utilisation to sample
            self.why = f"no GPU utilisation: {type(e).__name__}: {e}"
            return

        def sample() -> None:
            import torch

            while not self._stop.wait(interval_s):
                try:
                    self.samples.append(float(torch.cuda.utilization(device)))
                except Exception as e:  # a sampler must never end the trial
                    self.why = f"GPU utilisation stopped: {type(e).__name__}: {e}"
                    return

        self._thread = threading.Thread(target=sample, daemon=True, name="kdray-gpu-busy")
        self._thread.start()

    def epoch(self) -> dict[str, Any]:
        """The mean busy % since the last call (`gpu/busy_pct`), or why there is none."""
        if self._thread is None:
            return {M.GPU_BUSY_WHY: self.why} if self.why else {}
        taken, self.samples = self.samples, []
        return {M.GPU_BUSY: sum(taken) / len(taken)} if taken else {}

    def stop(self) -> None:
        self._stop.set()
