"""A real Ray cluster of two nodes on one machine, and the launch files.

Two raylets started with `ray start` (a head and a second node, 1 CPU and a custom resource
each) form a two-node cluster; the smoke search is submitted with `ray job submit`. One test
checks that trials run on both nodes; one kills the second node mid-trial and checks that the
trial is retried from its checkpoint and the search completes. Each test stops every Ray process
it started. Marked `cluster`: `python -m pytest -m cluster` runs them alone.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT
from tests.ray_nodes import LocalNodes


LAUNCH = ROOT / "launch"


@pytest.fixture
def two_nodes(private_cache):
    """A head `a` and a second node `b`, one CPU each."""
    cluster = LocalNodes().start_head("a")
    cluster.add("b")
    yield cluster
    alive = cluster.stop()
    assert alive == [], f"Ray processes left running: {alive}"


@pytest.mark.cluster
def test_trials_run_on_both_nodes_of_a_two_node_cluster(two_nodes, tmp_path):
    """Trials land on both nodes; Tune and Train write to --storage-path (standing in for a
    bucket or a shared mount), the final stage reads the retrained student back from it."""
    ids = two_nodes.node_ids()
    assert set(ids) == {"node_a", "node_b"}
    storage = tmp_path / "shared"
    r = two_nodes.submit(["--trials", "4", "--set", "search.concurrency=2", "--set", "space.epochs=[2]",
                          "--set", "final.baselines=false", "--set", "final.seeds=2", "--set", "serve.export=false",
                          "--set", "serve.runtime=pytorch",
                          "--storage-path", str(storage)],
                         tmp_path / "runs",
                         timeout=900)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    run = tmp_path / "runs" / "smoke"
    rows = pq.read_table(run / "search" / "trials.parquet").to_pylist()
    assert len(rows) == 4 and all(row["status"] in ("completed", "stopped early") for row in rows)
    # The node each trial trained on, as the trial reported it.
    assert {row["node"] for row in rows} == set(ids.values()), rows
    # Checkpoints went to the storage path (the Tune experiments), not the run directory; the
    # final stage loaded them (seed 0: the chosen search trial's, seed 1: its own retrain's).
    assert len(list((storage / "smoke" / "search").glob("*/checkpoint_*"))) >= 4
    assert len(list((storage / "smoke" / "final" / "tune").glob("*/checkpoint_*"))) >= 1
    assert all(row["checkpoint_path"].startswith(str(storage)) for row in rows)
    assert not (run / "train").exists()
    assert (run / "final" / "student" / "model.safetensors").is_file() and (run / "report.md").is_file()


@pytest.mark.cluster
def test_a_node_killed_mid_trial_costs_a_retry_not_the_search(two_nodes, tmp_path):
    job = two_nodes.submit(["--trials", "3", "--no-final", "--set", "search.concurrency=2",
                            "--set", "space.epochs=[6]", "--set", "search.grace_period=6",
                            "--set", "search.max_failures=2"], tmp_path, wait=False)
    # Wait until two trials are training (one per node: each node has room for one worker).
    deadline = time.time() + 600
    while time.time() < deadline:
        running = {line.split()[0] for line in two_nodes.logs(job).splitlines()
                   if re.match(r"^\w{8}\s.*\s[1-5]\s+\S+\s+running$", line)}
        if len(running) >= 2:
            break
        assert two_nodes.status(job) in ("PENDING", "RUNNING"), two_nodes.logs(job)[-4000:]
        time.sleep(1)
    else:
        raise AssertionError(two_nodes.logs(job)[-4000:])
    two_nodes.kill("b")
    deadline = time.time() + 900
    while two_nodes.status(job) in ("PENDING", "RUNNING") and time.time() < deadline:
        time.sleep(3)
    logs = two_nodes.logs(job)
    assert two_nodes.status(job) == "SUCCEEDED", logs[-6000:]
    rows = pq.read_table(tmp_path / "smoke" / "search" / "trials.parquet").to_pylist()
    assert len(rows) == 3 and all(row["status"] == "completed" for row in rows), rows
    assert all(len(row["val_accuracy_per_epoch"]) == 6 for row in rows)
    # The trial that lost its worker went on from its last epoch checkpoint, not from scratch.
    assert re.search(r"retried after a failure .*; resumed after epoch [1-5] from its checkpoint", logs), logs[-6000:]
    # The GCS marks the killed node dead once its health checks fail (seconds; the retried trial
    # can finish first).
    deadline = time.time() + 90
    while set(two_nodes.node_ids()) != {"node_a"} and time.time() < deadline:
        time.sleep(1)
    assert set(two_nodes.node_ids()) == {"node_a"}
    assert "Ray nodes and no --storage-path" in logs  # kdray saw two nodes and a local path, and said so


# ----------------------------------------------------------------------------- launch files


def search_args(command: str) -> list[str]:
    """The arguments of the `python -m kdray.search` in a shell command (variables filled in)."""
    command = re.sub(r"\$\{?(\w+)[^}\s\"]*\}?", "/tmp/x", command.replace("\\\n", " "))
    words = shlex.split(command)
    i = words.index("kdray.search")
    return [w for w in words[i + 1:] if w != '"$@"' and w != "$@"]


def check_search_command(args: list[str]) -> None:
    from kdray.cli.main import command
    from kdray.config import load_config

    parsed = command("search")[1].parse_args(args)
    space = ROOT / parsed.space if not Path(parsed.space).is_absolute() else Path(parsed.space)
    load_config(space, parsed.overrides, budget=parsed.budget)  # the space file exists and loads
    assert parsed.storage_path, "a cluster run needs --storage-path"


def test_cluster_launcher_config_is_valid_and_closed_to_the_world():
    cfg = yaml.safe_load((LAUNCH / "aws.yaml").read_text())
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any(t.get("resources", {}).get("GPU") for t in cfg["available_node_types"].values())
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    rules = cfg["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]  # SSH only
    assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"])
    assert any("kdray" in c for c in cfg["setup_commands"])
    (line,) = [l for l in (LAUNCH / "aws.yaml").read_text().splitlines() if "kdray.search" in l]
    check_search_command(search_args(line.lstrip("# ")))


def test_kuberay_rayjob_is_valid():
    job = yaml.safe_load((LAUNCH / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"]
    check_search_command(search_args(spec["entrypoint"]))


def test_slurm_script_starts_ray_on_the_allocation_and_runs_the_search():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert text.startswith("#!/bin/bash") and "#SBATCH --nodes=" in text
    assert re.search(r"ray start --head .*--dashboard-host=127\.0\.0\.1", text.replace("\\\n", " "))
    assert "ray start --address" in text and "ray stop" in text
    r = subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    start = text.index("python -m kdray.search")
    check_search_command(search_args(text[start:text.index("\n", text.index('"$@"'))]))


def test_launch_readme_commands_are_accepted():
    text = (LAUNCH / "README.md").read_text()
    block = text[text.index("ray job submit"):]
    block = block[:block.index("\n", block.index("kdray.search"))]
    check_search_command(search_args(block))


def test_a_local_ray_starts_the_dashboard_only_for_worker_groups():
    """The dashboard frees the placement groups of stopped several-worker trials (RAY_NOTES.md);
    a run of one-worker trials starts none, so it skips the dashboard's ~4 s start-up."""
    from kdray.config import load_config
    from kdray.runtime.cluster import needs_dashboard

    assert not needs_dashboard(load_config("default", []))  # the teacher's 2 CPUs are one worker
    assert needs_dashboard(load_config("smoke", ["resources.workers=2"]))
    assert needs_dashboard(load_config("smoke", ["teacher.resources={workers: 2, cpus_per_worker: 1}"]))
