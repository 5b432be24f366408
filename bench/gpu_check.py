"""The GPU check: what the simulated cluster in the tests cannot settle, settled on a real GPU.

    python bench/gpu_check.py [--output-dir bench/results] [--search-timeout 240]

Writes `gpu-check-cuda.json` where torch sees a GPU and `gpu-check-cpu.json` elsewhere; a
check that needs a GPU (or two) is then recorded as skipped, with why. At most ~8 minutes on a
GPU machine; each check has a status (`passed`, `failed`, `skipped`) and its numbers:

- `zero_gpu_task`: a Ray task that holds no GPU sees none (`CUDA_VISIBLE_DEVICES=""`, CUDA not
  available inside), and one that holds a GPU computes on it (`kdray.runtime.devices.assigned`).
- `nccl_two_ranks`: two Ray Train workers, one GPU each, all-reduce over NCCL (needs 2 GPUs).
- `memory_probe`: the probe's per-trial bytes (`kdray.evaluate.memory`) against what `nvidia-smi` shows a
  process use while it trains that student (the probe must not undercount).
- `allocator_reserve`: the CUDA allocator's reserve after one trial, and after
  `kdray.runtime.devices.release_cached_memory` (what a reused trial process hands to the next trial).
- `bf16`: the compute capability, what `train.precision: auto` resolves to, and a bf16 forward.
- `first_call_per_shape`: the first and a warm batch-1 pass at several lengths (why the
  benchmark warms every timed shape).
- `readme_gpu_command`: the README's GPU command on the embedded default, under a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def check(name: str, results: dict, fn: Any, *args: Any, needs_gpus: int = 0) -> None:
    """Run one check into `results[name]`: skipped where the machine has too few GPUs."""
    import torch

    have = torch.cuda.device_count()
    if have < needs_gpus:
        results[name] = {"status": "skipped", "why": f"needs {needs_gpus} GPU(s); this machine has {have}"}
        print(f"{name}: skipped ({results[name]['why']})", flush=True)
        return
    t0 = time.perf_counter()
    try:
        out = fn(*args)
        results[name] = {"status": "passed" if out.pop("ok", True) else "failed", **out}
    except Exception as e:  # a check that breaks is a finding, not the end of the check
        results[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    results[name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"{name}: {results[name]['status']} ({results[name]['seconds']} s)", flush=True)


def zero_gpu_task() -> dict:
    import ray
    import torch

    from kdray.runtime.cluster import init_ray

    init_ray(dashboard=False)

    @ray.remote(num_gpus=0, num_cpus=1)
    def none() -> dict:
        from kdray.runtime.devices import assigned

        where = assigned()
        import torch

        return {**where.as_dict(), "cuda_available_inside": torch.cuda.is_available()}

    out = {"zero_gpu": ray.get(none.remote())}
    ok = out["zero_gpu"]["device"] == "cpu" and not out["zero_gpu"]["cuda_available_inside"]
    if torch.cuda.is_available():
        @ray.remote(num_gpus=1, num_cpus=1)
        def one() -> dict:
            import torch

            from kdray.runtime.devices import assigned

            where = assigned()
            x = torch.ones(4, device=where.torch_device())
            return {**where.as_dict(), "tensor_device": str(x.device)}

        out["one_gpu"] = ray.get(one.remote())
        ok = ok and out["one_gpu"]["tensor_device"].startswith("cuda")
    else:
        out["one_gpu"] = {"status": "skipped", "why": "no GPU on this machine"}
    return {"ok": ok, **out}


def nccl_two_ranks() -> dict:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        import ray.train
        import torch
        import torch.distributed as dist

        from kdray.runtime.devices import assigned

        where = assigned()
        torch.cuda.set_device(where.torch_device())
        t = torch.ones(1, device=where.torch_device()) * (ray.train.get_context().get_world_rank() + 1)
        dist.all_reduce(t)
        ray.train.report({"sum": float(t.item()), "gpu_ids": ",".join(where.gpu_ids)})

    result = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=2, use_gpu=True)).fit()
    return {"ok": result.metrics["sum"] == 3.0, "metrics": result.metrics}


def _default_student() -> tuple[Any, Any]:
    """The default space's largest student and its real data, teacher logits stood in by zeros
    (memory does not depend on their values)."""
    import dataclasses

    import numpy as np

    from kdray.config import load_config
    from kdray.data.load import load_data
    from kdray.data.tokenize import tokenize
    from kdray.stages.search import largest_student
    from kdray.train.batches import Split
    from kdray.train.logits import TeacherLogits
    from kdray.train.loop import DistillData, DistillJob
    from kdray.train.models import load_tokenizer

    cfg = load_config("default")
    task = load_data(cfg.data)
    tok = load_tokenizer(cfg.student)
    tk, _ = tokenize(task, tok, cfg.data.max_length)
    train, val = Split.from_dataset(tk["train"]), Split.from_dataset(tk["validation"])
    logits = TeacherLogits(np.concatenate([train.example_ids, val.example_ids]), np.zeros((len(train) + len(val), 2)))
    job = DistillJob(dataclasses.replace(largest_student(cfg), init="pretrained"), cfg.train, task.label_names,
                     tok.pad_token_id)
    return job, DistillData(train, val, logits)


def memory_probe() -> dict:
    """The probe in this process, then one epoch of the same student in a child process whose
    use `nvidia-smi` samples."""
    import torch

    from kdray.evaluate.memory import measure

    job, data = _default_student()
    mem = measure(job, data, torch.device("cuda", 0), torch.cuda.get_device_name(0))
    child = subprocess.Popen([sys.executable, __file__, "--train-one-epoch"], cwd=ROOT)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _smi_used_mib(child.pid))
        time.sleep(0.2)
    predicted = mem.per_trial / 2**20
    return {"ok": child.returncode == 0 and predicted >= peak, "probe": mem.as_dict(), "predicted_mib": predicted,
            "nvidia_smi_peak_mib": peak, "ratio_predicted_to_measured": predicted / peak if peak else None}


def _smi_used_mib(pid: int) -> int:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return sum(int(used) for line in out.splitlines() if line.strip()
               for p, used in [line.split(",")] if int(p) == pid)


def train_one_epoch() -> None:
    import dataclasses

    import torch

    from kdray.train.loop import distill

    job, data = _default_student()
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, epochs=1))
    distill(job, data, lambda metrics, ckpt: None, device=torch.device("cuda", 0), log=False)


def allocator_reserve() -> dict:
    import dataclasses

    import torch

    from kdray.runtime.devices import release_cached_memory
    from kdray.train.loop import distill

    job, data = _default_student()
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, epochs=1))
    device = torch.device("cuda", 0)
    distill(job, data, lambda metrics, ckpt: None, device=device, log=False)
    kept = torch.cuda.memory_reserved(device)
    release_cached_memory(device)
    after = torch.cuda.memory_reserved(device)
    return {"ok": after < kept, "reserved_after_trial_mib": kept / 2**20, "reserved_after_release_mib": after / 2**20}


def bf16() -> dict:
    import torch

    from kdray.train.models import build_model
    from kdray.train.precision import autocast_for, native_bf16, resolve_precision

    job, _ = _default_student()
    device = torch.device("cuda", 0)
    model = build_model(job.model, 2, device=device).eval()
    ids = torch.randint(0, 1000, (8, 32), device=device)
    with torch.no_grad(), autocast_for(device, "bf16"):
        out = model(input_ids=ids).logits
    capability = torch.cuda.get_device_capability(device)
    return {"ok": bool(torch.isfinite(out).all()), "capability": list(capability), "native_bf16": native_bf16(device),
            "auto_resolves_to": resolve_precision(device, "auto"),
            "torch_is_bf16_supported": torch.cuda.is_bf16_supported()}


def first_call_per_shape() -> dict:
    import torch

    from kdray.train.models import build_model

    job, _ = _default_student()
    device = torch.device("cuda", 0)
    model = build_model(job.model, 2, device=device).eval()
    rows = {}
    with torch.inference_mode():
        for length in (8, 16, 24, 32, 48, 64):
            ids = torch.randint(0, 1000, (1, length), device=device)
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(input_ids=ids)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1000)
            rows[length] = {"first_ms": times[0], "warm_ms": min(times[1:])}
    return {"per_length": rows}


def readme_gpu_command(timeout_s: int, out_dir: Path) -> dict:
    """The README's GPU command (the embedded default on the GPU), stopped at `timeout_s`."""
    cmd = [sys.executable, "-m", "kdray.search", "--budget", "1e6", "--output-dir", str(out_dir), "--name", "gpu-check",
           "--overwrite", "--wandb", "disabled"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        status, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        status, tail = "timed out", ((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))[-4000:]
    return {"ok": status == 0 or status == "timed out", "command": " ".join(cmd[1:]), "exit": status,
            "seconds": time.perf_counter() - t0, "console_tail": tail}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--search-timeout", type=int, default=240, help="seconds the README's GPU command may run")
    ap.add_argument("--train-one-epoch", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_one_epoch:
        train_one_epoch()
        return 0
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    from kdray.machine import device_name, package_version

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {}
    check("zero_gpu_task", results, zero_gpu_task)
    check("nccl_two_ranks", results, nccl_two_ranks, needs_gpus=2)
    for name, fn in (("memory_probe", memory_probe), ("allocator_reserve", allocator_reserve), ("bf16", bf16),
                     ("first_call_per_shape", first_call_per_shape)):
        check(name, results, fn, needs_gpus=1)
    check("readme_gpu_command", results, readme_gpu_command, args.search_timeout, Path("/tmp/kdray-gpu-check"),
          needs_gpus=1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record = {"check": "gpu", "device": device_name(torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit or None,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "versions": {p: package_version(p) for p in ("torch", "ray", "transformers", "peft")},
              "checks": results}
    out = Path(args.output_dir) / f"gpu-check-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["status"] != "failed" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
