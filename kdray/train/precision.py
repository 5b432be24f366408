"""The precision policy: what `train.precision` resolves to on a device, and the serving
precision test scores and benchmarks use."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU that supports it (Ampere on), a CPU
    with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        # Compute capability 8 (Ampere) and later. `torch.cuda.is_bf16_supported()` also says
        # yes for T4 and V100, where bf16 is emulated and slower than fp32.
        return torch.cuda.get_device_properties(device).major >= 8
    if device.type != "cpu":
        return False
    try:  # a private but stable probe (torch >= 2.3); without it, assume no
        caps = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(device: torch.device, precision: str) -> str:
    """`bf16` or `fp32` for a `TrainConfig.precision` on `device`.

    `auto` takes bf16 where it is native: on a 2-core Zen 4 CPU (AVX512-BF16) the default ran
    end to end in 10 min 31 s against 13 min 50 s in fp32, with the same choice and accuracy
    (README, "Performance").
    """
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def describe_precision(precision: str, device_type: str) -> str:
    """What `precision` trains in on `device_type` (`cpu` or `cuda`), for the resources line a run
    prints. `auto` on CPUs is read on this machine: the workers of a CPU cluster decide for
    themselves and say so in their trial logs."""
    if precision != "auto":
        return f"{precision} (train.precision)"
    if device_type == "cuda":
        return "bf16 on GPUs that have it, else fp32 (train.precision auto)"
    here = resolve_precision(torch.device("cpu"), "auto")
    why = "has AVX512-BF16 or AMX" if here == "bf16" else "has neither AVX512-BF16 nor AMX"
    return f"{here} (train.precision auto: this machine's CPU {why})"


def serving_precision(device: torch.device) -> str:
    """The precision test scores and benchmarks run in, whatever the training ran in: what a user
    serving the saved fp32 model gets by default. bf16 autocast on a GPU that computes it
    natively; fp32 on a CPU, so the teacher and every student are scored alike."""
    return "auto" if device.type == "cuda" else "fp32"


def autocast_for(device: torch.device, precision: str = "auto"):
    """The autocast context of `precision` on `device` (bf16 needs no loss scaling)."""
    bf16 = resolve_precision(device, precision) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
