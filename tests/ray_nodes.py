"""Ray nodes started with `ray start` on this machine, as a real multi-node cluster.

Each node is its own `ray start --block` process group, with its own temp dir and ports, so it
never touches the test session's own cluster. A node may hold *logical* GPUs (`--num-gpus`):
Ray schedules and assigns them exactly as real ones. Such a cluster is a simulation of a GPU
cluster, and the processes it starts compute on the CPU only because `KDRAY_SIMULATE_GPUS` is
set in their environment (`kdray.runtime.devices`): `LocalNodes(simulate_gpus=True)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil


RAY = str(Path(sys.executable).parent / "ray")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalNodes:
    """A head and any number of nodes that join it, each named by a custom resource
    `node_<name>` (so a test can tell which node a process ran on)."""

    def __init__(self, simulate_gpus: bool = False) -> None:
        # Short: Ray's unix socket paths live under the temp dir and must stay under 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="kdc", dir="/tmp"))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        if simulate_gpus:
            self.env["KDRAY_SIMULATE_GPUS"] = "1"

    def _start(self, name: str, cpus: float, gpus: float, args: list[str]) -> None:
        # Every fixed default port would collide with the other nodes (and the session's cluster).
        ports = [(flag, free_port()) for flag in ("--node-manager-port", "--object-manager-port",
                                                  "--metrics-export-port", "--dashboard-agent-listen-port",
                                                  "--dashboard-agent-grpc-port", "--runtime-env-agent-port")]
        log = open(self.root / f"{name}.log", "w")
        cmd = [RAY, "start", "--block", "--num-cpus", f"{cpus:g}", "--num-gpus", f"{gpus:g}",
               "--resources", json.dumps({f"node_{name}": 1}), "--object-store-memory", str(512 * 2**20),
               "--temp-dir", str(self.root / name), *(str(x) for pair in ports for x in pair), *args]
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=self.env)

    def start_head(self, name: str = "a", cpus: float = 1, gpus: float = 0) -> "LocalNodes":
        self._start(name, cpus, gpus, ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                                       "--dashboard-port", str(self.dashboard_port),
                                       "--ray-client-server-port", str(free_port())])
        self.wait_nodes(1)
        return self

    def add(self, name: str, cpus: float = 1, gpus: float = 0, wait: bool = True) -> None:
        self._start(name, cpus, gpus, ["--address", self.address])
        if wait:
            self.wait_nodes(len(self.procs))

    def nodes(self) -> list[dict]:
        r = subprocess.run([RAY, "list", "nodes", "--address", self.dashboard, "--format", "json", "--detail"],
                           capture_output=True, text=True, timeout=60, env=self.env)
        return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip().startswith("[") else []

    def node_ids(self) -> dict[str, str]:
        """Custom resource name (node_a, node_b, ...) -> node id, alive nodes only."""
        out = {}
        for n in self.nodes():
            if n.get("state") == "ALIVE":
                for res in n.get("resources_total", {}):
                    if res.startswith("node_"):
                        out[res] = n["node_id"]
        return out

    def wait_nodes(self, k: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.node_ids()) == k:
                return
            time.sleep(1)
        raise AssertionError(f"{k} Ray node(s) did not come up: " + "".join(
            (self.root / f"{n}.log").read_text()[-2000:] for n in self.procs))

    def kill(self, name: str) -> None:
        """SIGKILL a node: its `ray start` process, its raylet and every worker under them."""
        proc = psutil.Process(self.procs[name].pid)
        tree = [proc, *proc.children(recursive=True)]
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)

    def stop(self) -> list[int]:
        """Kill every process the cluster started; return the pids still alive (none, we hope)."""
        trees = []
        for name, popen in self.procs.items():
            try:
                proc = psutil.Process(popen.pid)
                trees += [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for name in self.procs:
            try:
                os.killpg(self.procs[name].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in trees:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(trees, timeout=30)
        # Processes of this cluster outside those trees (daemonized ones) carry its temp dir.
        for p in psutil.process_iter(["pid", "cmdline"]):
            if str(self.root) in " ".join(p.info["cmdline"] or []):
                alive.append(p)
                p.kill()
        shutil.rmtree(self.root, ignore_errors=True)
        return [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def submit(self, args: list[str], out: Path, wait: bool = True, **kw) -> subprocess.CompletedProcess | str:
        """`ray job submit` of `kdray.search --space smoke` (the driver runs on the head)."""
        env = {"RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled", "KDRAY_CACHE": os.environ["KDRAY_CACHE"]}
        cmd = [RAY, "job", "submit", "--address", self.dashboard, "--runtime-env-json",
               json.dumps({"env_vars": env}), *([] if wait else ["--no-wait"]), "--",
               sys.executable, "-m", "kdray.search", "--space", "smoke", "--output-dir", str(out), "--wandb",
               "disabled", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=self.env, **kw)
        if wait:
            return r
        assert r.returncode == 0, r.stdout + r.stderr
        return re.search(r"raysubmit_\w+", r.stdout).group(0)

    def kdray(self, args: list[str], **kw) -> subprocess.Popen:
        """`python -m kdray ARGS --address <this cluster>` as a driver process on this machine,
        with the nodes' environment (the simulation's switch included)."""
        env = {**self.env, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
        if "KDRAY_CACHE" in os.environ:  # the test's own cache, set after this cluster started
            env["KDRAY_CACHE"] = os.environ["KDRAY_CACHE"]
        return subprocess.Popen([sys.executable, "-m", "kdray", *args, "--address", self.address], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.dashboard}{path}", timeout=60) as r:
            return json.loads(r.read())

    def logs(self, job: str) -> str:
        return self._get(f"/api/jobs/{job}/logs")["logs"]

    def status(self, job: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (Ray's job REST API)."""
        return self._get(f"/api/jobs/{job}")["status"]
