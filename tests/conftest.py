"""Shared fixtures: tiny random models (2 layers, hidden 32), a private cache, a Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


# Before Ray or wandb is imported anywhere: no token auth for the local test cluster, no wandb key.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]

def cpu_computes_bf16() -> bool:
    """What the kernel says of this CPU, read apart from kdray's probe (torch's capability query):
    bf16 in hardware (AVX512-BF16 or AMX) or not. Tests derive `precision: auto` from this."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_CONFIGS = {
    "bert": {"model_type": "bert", **TINY},
    "distilbert": {"model_type": "distilbert", "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
    "roberta": {"model_type": "roberta", **TINY, "vocab_size": 1000, "max_position_embeddings": 66,
                "type_vocab_size": 1},
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test session writes its cache entries into a temporary directory."""
    monkeypatch.setenv("KDRAY_CACHE", str(tmp_path_factory.getbasetemp() / "kdray-cache"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the session, as big as the CI machine: 2 CPUs."""
    import ray

    from kdray.runtime.cluster import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


#: The smoke run's budget: under most of the space's choices (r=8 on every module of both layers
#: costs 6,242), so the sampler meets over-budget samples and must reject them.
SMOKE_BUDGET = 3000
SMOKE_ARGS = ["search", "--space", "smoke", "--trials", "6", "--wandb", "offline", "--budget", str(SMOKE_BUDGET),
              "--set", "space.learning_rate=[0.01, 0.3]", "--set", "search.concurrency=2"]


@pytest.fixture(scope="session")
def smoke_console(ray_cluster, tmp_path_factory) -> tuple[Path, str]:
    """One end-to-end smoke run (search + final stage + report) as a user runs it: the `kdray`
    command in its own process, joining the session's cluster with --address (so no second
    Ray starts). 6 trials, 2 at a time, wandb offline; a wide learning-rate range makes some
    trials fall behind at the first rung, so ASHA stops them. Returns (run dir, console)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("smoke-run")
    env = {**os.environ, "KDRAY_CACHE": str(tmp_path_factory.getbasetemp() / "kdray-cache"), "PYTHONPATH": str(ROOT)}
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "kdray", *SMOKE_ARGS, "--output-dir", str(out), "--address", address],
                          cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    console = proc.stdout
    assert proc.returncode == 0, console[-5000:]
    return out / "smoke", console


@pytest.fixture(scope="session")
def smoke_run(smoke_console) -> Path:
    """The run directory of the session's smoke run (`smoke_console`)."""
    return smoke_console[0]


def pytest_collection_modifyitems(config, items):
    """Run the `cluster` tests (their own two-node Ray cluster started with `ray start`) before
    anything starts the session's local cluster: with both on one 2-core machine, the two-node
    cluster's Train worker groups timed out starting in CI."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)
