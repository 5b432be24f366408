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
