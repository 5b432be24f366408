"""A SIMULATED GPU cluster: Ray nodes on this machine with logical GPUs, and what kdray decides on it.

Three and more `ray start` nodes form one cluster: a CPU-only head like `launch/aws.yaml`'s, and
GPU workers whose GPUs are *logical* (`--num-gpus` on a machine with none). Ray schedules and
assigns them exactly as real GPUs (`CUDA_VISIBLE_DEVICES`, `ray.get_gpu_ids()`); the processes
compute on the CPU only because `KDRAY_SIMULATE_GPUS` is set in this cluster's environment, the
one seam `kdray.runtime.devices` offers (refused where torch can use CUDA). The tests read what Ray and
kdray decided, never how fast anything ran: which node and GPU id each trial, rank and measuring
task got, that no zero-GPU process saw a GPU, that students spread over the GPUs, that a
placement no node can hold exits 2 before Tune, and that a GPU node lost mid-search costs retries
from checkpoints, not results. Marked `cluster` (run before the session's own cluster).
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.ray_nodes import LocalNodes


#: Small data and a one-epoch teacher: every run below shares one cached teacher per device plan.
BASE = ["--space", "smoke", "--wandb", "disabled", "--set", "data.max_train_samples=512",
        "--set", "data.max_validation_samples=128", "--set", "teacher.train.epochs=1"]
GPU_NODES = {"g1": (2, 1), "g2": (3, 2)}  # name: (CPUs, logical GPUs)
RESOURCE_REQUESTS = b"autoscaler_resource_request"  # where Ray's v1 autoscaler reads `request_resources`
SIMULATED = "(simulated on cpu)"


@pytest.fixture(scope="module")
def sim():
    """The simulated cluster: a CPU-only head; GPU nodes join in the tests."""
    cluster = LocalNodes(simulate_gpus=True).start_head("head", cpus=1)
    yield cluster
    alive = cluster.stop()
    assert alive == [], f"Ray processes left running: {alive}"


def ensure_gpu_nodes(sim: LocalNodes) -> dict[str, str]:
    """g1 (1 logical GPU) and g2 (2) are up; returns node name -> Ray node id."""
    for name, (cpus, gpus) in GPU_NODES.items():
        if name not in sim.procs:
            sim.add(name, cpus=cpus, gpus=gpus)
    return {name.removeprefix("node_"): node for name, node in sim.node_ids().items()}


def run_kdray(sim: LocalNodes, args: list[str], timeout: float = 600, on_line=None) -> tuple[int, str]:
    proc = sim.kdray(args, bufsize=1)
    lines = []
    deadline = time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(line)
        assert time.time() < deadline, "".join(lines[-60:])
    return proc.wait(timeout=60), "".join(lines)


def placements(run: Path) -> dict[str, list[dict]]:
    """trial id -> its ranks' placements (node id, GPU ids, device), as each trial reported them."""
    return {r["trial_id"]: json.loads(r["placement"]) for r in pq.read_table(run / "search" / "trials.parquet").to_pylist()}


def teacher_placement(console: str, cache: Path) -> dict:
    path = re.search(r"teacher: (?:cached at|cache hit) (\S+?)[: ]", console).group(1)
    return json.loads((Path(path) / "record.json").read_text())["placement"]


def test_gpu_nodes_the_autoscaler_can_add_are_planned_and_waited_for(sim, tmp_path):
    """aws.yaml's case: a CPU head and GPU workers the autoscaler starts on demand. A simulated
    autoscaler reports its node groups to the GCS (as autoscaler v2 and KubeRay do) and starts
    a GPU node when kdray asks for one (`request_resources`). The `auto` smoke space then trains
    on the GPU node, not on the head's CPU."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    gcs = GcsClient(address=sim.address)
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu_worker", max_count=1)
    group.resources.update({"CPU": 2, "GPU": 1})
    gcs.report_cluster_config(config.SerializeToString())
    asked: list = []

    def autoscaler(line: str) -> None:
        if asked or "no GPU node has joined yet" not in line:
            return
        deadline = time.time() + 60
        while time.time() < deadline and not asked:
            raw = gcs.internal_kv_get(RESOURCE_REQUESTS, None)
            if raw:
                asked.extend(json.loads(raw))
            time.sleep(0.5)
        threading.Thread(target=sim.add, args=("g1", *GPU_NODES["g1"]), daemon=True).start()

    try:
        code, console = run_kdray(sim, ["search", *BASE, "--trials", "2", "--no-final", "--set", "space.epochs=[1]",
                                        "--set", "search.concurrency=1", "--output-dir", str(tmp_path)],
                                  on_line=autoscaler)
    finally:
        gcs.report_cluster_config(autoscaler_pb2.ClusterConfig().SerializeToString())
    assert code == 0, console[-4000:]
    assert asked == [{"GPU": 1}], asked  # kdray asked the autoscaler for a GPU node ...
    assert "a GPU node joined after" in console  # ... and waited for it
    assert "resources (students): a whole GPU per trial" in console and "[SIMULATION: logical GPUs" in console
    g1 = ensure_gpu_nodes(sim)["g1"]
    for ranks in placements(tmp_path / "smoke").values():
        assert [(r["node_id"], r["gpu_ids"], r["device"]) for r in ranks] == [(g1, ["0"], f"cuda:0 {SIMULATED}")]
    teacher = teacher_placement(console, tmp_path)
    assert (teacher["node_id"], teacher["gpu_ids"]) == (g1, ["0"])


def test_students_spread_and_the_measuring_runs_on_gpu_nodes(sim, tmp_path):
    """Three GPUs on two nodes, three trials at once: one GPU each. The shapes' latencies, the
    transfer set's teacher logits, the memory probe and the final stage's scores and benchmark
    run as tasks on GPU nodes, and the report names that device."""
    nodes = ensure_gpu_nodes(sim)
    code, console = run_kdray(sim, ["search", *BASE, "--trials", "3", "--set", "search.concurrency=3",
                                    "--set", "space.epochs=[2]", "--set", "search.grace_period=2",
                                    "--set", "space.keep_layers=[[0],[0,1]]", "--set", "space.layers=all",
                                    "--set", "data.unlabeled=rest", "--set", "data.max_unlabeled_samples=200",
                                    "--set", "final.seeds=1", "--set", "final.baselines=false",
                                    "--set", "final.latency_runs=5", "--output-dir", str(tmp_path)])
    assert code == 0, console[-4000:]
    assert "a whole GPU per trial: 3 at once over 3 GPU(s) before any GPU holds 2" in console, console[-4000:]
    trials = placements(tmp_path / "smoke")
    assert len(trials) == 3
    held = {(r["node_id"], tuple(r["gpu_ids"])) for ranks in trials.values() for r in ranks}
    assert len(held) == 3 and {n for n, _ in held} == {nodes["g1"], nodes["g2"]}, trials  # every GPU, none twice
    assert all(r["device"].endswith(SIMULATED) for ranks in trials.values() for r in ranks)
    assert re.search(r"student shapes: batch-1 p50 in onnx-int8 \(serve.runtime\), tokenization included, on "
                     r".*\(a simulated GPU\) \(measured now\)", console)
    assert re.search(r"teacher: transfer set labelled in \d+s on .*\(a simulated GPU\)", console)
    assert re.search(r"memory: GPU: one trial holds [\d,]+ MiB .* \(a simulation: estimated on the CPU\)", console)
    final = json.loads((tmp_path / "smoke" / "final" / "final.json").read_text())
    assert final["placement"]["node_id"] in (nodes["g1"], nodes["g2"]) and final["placement"]["gpu_ids"]
    assert "a simulated GPU" in final["device"]
    assert f"faster at batch 1 on {final['device']}" in (tmp_path / "smoke" / "report.md").read_text()


def test_ddp_ranks_hold_distinct_gpus_and_a_cpu_teacher_sees_none(sim, tmp_path):
    nodes = ensure_gpu_nodes(sim)
    code, console = run_kdray(sim, ["search", *BASE, "--trials", "1", "--no-final", "--set", "space.epochs=[1]",
                                    "--set", "resources.workers=2", "--set", "teacher.resources.device=cpu",
                                    "--output-dir", str(tmp_path)])
    assert code == 0, console[-4000:]
    assert "resources (students): 1 whole GPU per rank" in console and "resources (teacher): CPU (device: cpu)" in console
    (ranks,) = placements(tmp_path / "smoke").values()
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    held = [(r["node_id"], tuple(r["gpu_ids"])) for r in ranks]
    assert len(set(held)) == 2 and all(len(g) == 1 for _, g in held), ranks  # one GPU each, never the same
    assert {n for n, _ in held} <= {nodes["g1"], nodes["g2"]}
    teacher = teacher_placement(console, tmp_path)
    assert teacher["gpu_ids"] == [] and teacher["device"] == "cpu" and teacher["visible_devices"] == ""


def test_a_placement_no_node_can_hold_exits_2_before_tune(sim, tmp_path):
    ensure_gpu_nodes(sim)
    t0 = time.time()
    code, console = run_kdray(sim, ["search", *BASE, "--set", "resources.workers=4", "--set", "resources.device=gpu",
                                    "--output-dir", str(tmp_path)])
    assert code == 2, console[-3000:]
    assert "students trials need 4 worker(s) of 1 CPU + 1 GPU at once, and the cluster" in console
    assert "holds 3. Fix: --set resources.workers=3" in console and "Traceback" not in console
    assert list(tmp_path.iterdir()) == []  # no run directory, no Tune experiment
    assert time.time() - t0 < 60


def test_a_gpu_node_removed_mid_search_costs_retries_not_results(sim, tmp_path):
    """g2 (two of the three GPUs) dies while three trials train: its trials are retried on the
    GPU left, each from its last epoch checkpoint; every trial ends with all its epochs."""
    nodes = ensure_gpu_nodes(sim)
    epochs = 6
    proc = sim.kdray(["search", *BASE, "--trials", "3", "--no-final", "--set", "search.concurrency=3",
                      "--set", f"space.epochs=[{epochs}]", "--set", f"search.grace_period={epochs}",
                      "--set", "search.max_failures=2", "--output-dir", str(tmp_path),
                      "--storage-path", str(tmp_path / "shared")], bufsize=1)
    lines, started = [], {}
    for line in proc.stdout:
        lines.append(line)
        m = re.match(r"^(\w{8})\s.*\s(\d+)\s+\S+\s+running$", line)
        if m:
            started[m.group(1)] = int(m.group(2))
        if len(started) == 3:
            break
    sim.kill("g2")
    lines += proc.stdout.readlines()
    console = "".join(lines)
    assert proc.wait(timeout=600) == 0, console[-5000:]
    rows = pq.read_table(tmp_path / "smoke" / "search" / "trials.parquet").to_pylist()
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows), rows
    assert all(len(r["val_accuracy_per_epoch"]) == epochs == r["epochs_run"] for r in rows), [
        (r["trial_id"], r["val_accuracy_per_epoch"]) for r in rows]
    retried = re.findall(r"(\w{8}): retried after a failure .*; resumed after epoch ([1-9]) from its checkpoint", console)
    assert retried, console[-5000:]
    finals = placements(tmp_path / "smoke")
    for trial, _ in retried:  # the retry trained on the node that was left
        assert finals[trial][0]["node_id"] == nodes["g1"]
    # The GCS marks the killed node dead once its health checks fail (seconds; the retried trials
    # can finish first).
    deadline = time.time() + 90
    while "node_g2" in sim.node_ids() and time.time() < deadline:
        time.sleep(1)
    assert "node_g2" not in sim.node_ids()


def test_a_gpu_that_torch_cannot_use_is_an_error_with_the_fix(tmp_path):
    """Not a simulation: a node that claims a GPU (`ray start --num-gpus 1`) where torch has no
    CUDA, as a misbuilt GPU node would. The trial holding that GPU stops with the reason and the
    fix instead of training on the CPU while the GPU stays reserved."""
    cluster = LocalNodes(simulate_gpus=False).start_head("head", cpus=2, gpus=1)
    try:
        code, console = run_kdray(cluster, ["search", *BASE, "--trials", "1", "--no-final", "--output-dir", str(tmp_path)])
    finally:
        assert cluster.stop() == []
    assert code == 2, console[-3000:]
    assert "holds GPU(s) 0 on Ray node" in console and "cannot use CUDA: torch here is a CPU build" in console
    assert "Fix: install a CUDA build of torch on the GPU nodes" in console and "Traceback" not in console
