"""What this machine is and which packages it runs: recorded beside every measurement."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any


def device_name(device: Any) -> str:
    """The GPU's name, or the CPU's model and the threads torch computes with."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def package_version(pkg: str) -> str:
    """The installed version of `pkg`, or "unknown"."""
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "unknown"


class GpuSampler:
    """Samples every visible GPU's utilisation through NVML (`nvidia-ml-py`, the `gpu` extra)
    in a background thread while a stage runs: `with GpuSampler() as s: ...; s.summary()`.

    Without NVML or a GPU it samples nothing and its summary says why: GPU utilisation needs a
    GPU, and kdray never fakes it."""

    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self.samples: list[list[int]] = []
        self.reason: str | None = None
        self._stop = None
        self._thread = None

    def __enter__(self) -> "GpuSampler":
        import threading

        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as e:  # no nvidia-ml-py, no driver, no device: nothing to sample
            self.reason = f"no GPU utilisation: NVML unavailable ({type(e).__name__}: {e})"
            return self
        if not handles:
            self.reason = "no GPU utilisation: NVML sees no GPU"
            return self
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval_s):
                self.samples.append([pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles])

        self._thread = threading.Thread(target=sample, daemon=True, name="kdray-gpu-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        """Mean busy % over the samples (per GPU and overall), or why there are none."""
        if not self.samples:
            return {"gpu_busy_mean_pct": None, "samples": 0, "why": self.reason or "no sample taken (too short)"}
        per_gpu = [sum(col) / len(col) for col in zip(*self.samples)]
        return {"gpu_busy_mean_pct": sum(per_gpu) / len(per_gpu), "gpu_busy_per_gpu_pct": per_gpu,
                "samples": len(self.samples), "interval_s": self.interval_s}
