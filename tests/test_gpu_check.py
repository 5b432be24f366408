"""The GPU check runs everywhere: on a machine without a GPU it writes `gpu-check-cpu.json`,
runs what a CPU can show, and marks every GPU check skipped with why."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_the_gpu_check_on_a_cpu_marks_the_gpu_checks_skipped(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--output-dir", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads((tmp_path / "gpu-check-cpu.json").read_text())
    checks = record["checks"]
    assert checks["zero_gpu_task"]["status"] == "passed"
    assert checks["zero_gpu_task"]["zero_gpu"]["visible_devices"] == ""  # the task could see no GPU
    gpu_only = ["nccl_two_ranks", "memory_probe", "allocator_reserve", "bf16", "first_call_per_shape",
                "readme_gpu_command"]
    assert {name: checks[name]["status"] for name in gpu_only} == {name: "skipped" for name in gpu_only}
    assert checks["nccl_two_ranks"]["why"] == "needs 2 GPU(s); this machine has 0"
    assert record["commit"] and record["date"] and record["device"]
