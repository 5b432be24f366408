"""The resource plan: what the teacher and the trials hold, decided from the whole cluster.

The cluster is read once (`ClusterView`): the nodes that are up, and the node types its
autoscaler can still start (the launcher's config on the head, or the node groups the
autoscaler reports to the GCS). A snapshot of `ray.cluster_resources()` alone counts only live
nodes, so a cluster whose GPU workers start on demand (`launch/aws.yaml`: a CPU head, GPU workers
from 0) would plan CPUs, fit on the head and never make the autoscaler start a GPU node.

Each role (the teacher, the students) gets a `Plan`, printed with why:

- **Device.** `resources.device: auto` takes GPUs when the cluster has them or can add them;
  `gpu` requires them (on a cluster that says nothing of the nodes it can add, the run waits for
  GPU nodes to join, up to `resources.gpu_wait_s`); `cpu` never takes one.
- **DDP ranks hold whole GPUs**, one per rank: Ray places fractional bundles best-fit, so two
  ranks at 0.5 land on one GPU and NCCL refuses them ("Duplicate GPU detected", ray#48012).
- **Students spread before they share.** Ray gives fractional GPU requests the fullest GPU that
  still fits them (best-fit), so a share of 1/8 put the first eight trials on GPU 0 while the
  other GPUs idled. The share is therefore no smaller than the concurrency needs: with as many
  GPUs as trials each trial holds a whole GPU (distinct devices), and only more trials than GPUs
  share, at most `ceil(concurrency / GPUs)` per GPU, never more than memory allows
  (`kdray.evaluate.memory`).
- **A placement the cluster can never hold is refused** (`check_placements`) before any Tune
  run starts, with the fix: Ray Train would otherwise retry starting the worker group forever.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdray.config import ResourcesConfig
from kdray.errors import UserError
from kdray.runtime.devices import DeviceError, simulated, simulated_local_gpus


#: CPU the trial's own process holds when its Train workers do the work (several workers):
#: it must not hold the CPUs its workers need, and Ray refuses 0 (RAY_NOTES.md).
TRIAL_DRIVER_CPU = 0.01
#: Where the Ray cluster launcher writes its config on the head node (`ray up`; the
#: `--autoscaling-config` of `launch/aws.yaml`'s head start command).
LAUNCHER_CONFIG = Path("~/ray_bootstrap_config.yaml")
#: More students than this on one GPU starve on the host side (one CPU-bound loop each).
MAX_STUDENTS_PER_GPU = 8
#: A node type with no upper bound (`max_count: -1`): counted as this many nodes.
UNBOUNDED = 1000


@dataclass(frozen=True)
class NodeKind:
    """Nodes of one shape: one live node, or a type the autoscaler can start `count` of."""

    name: str
    """A live node's id, or the autoscaler's node type name."""
    cpus: float
    gpus: float
    gpu_type: str | None = None
    """Ray's `accelerator_type:<name>` resource of the node (A10G, H100, ...), when it has one."""
    count: int = 1
    live: bool = True

    def holds(self, bundle: dict[str, float]) -> int:
        """How many `bundle`s ({"CPU": c, "GPU": g}) one such node holds."""
        fits = [math.floor(have / need + 1e-9) for need, have in
                ((bundle.get("CPU", 0), self.cpus), (bundle.get("GPU", 0), self.gpus)) if need > 0]
        return min(fits) if fits else 0


@dataclass(frozen=True)
class ClusterView:
    """What the cluster has, and what it can add."""

    nodes: tuple[NodeKind, ...]
    """The live nodes."""
    addable: tuple[NodeKind, ...] = ()
    """Node types the autoscaler can start (each with the most it may start)."""
    autoscaler: str | None = None
    """Where `addable` was read: the launcher's config file or the GCS; None when nothing says."""
    local: bool = False
    """A Ray that kdray starts on this machine alone: no node can join."""

    @property
    def gpus(self) -> float:
        """GPUs up now."""
        return sum(n.gpus for n in self.nodes)

    @property
    def addable_gpus(self) -> float:
        return sum(n.gpus * n.count for n in self.addable)

    @property
    def gpus_can_join(self) -> bool:
        """Whether GPU nodes may still join: the autoscaler can add some, or nothing says
        otherwise (a joined cluster whose worker pods or nodes may still be starting)."""
        return not self.local and (self.autoscaler is None or self.addable_gpus > 0)

    def capacity(self, bundle: dict[str, float]) -> int:
        """How many `bundle`s the cluster can hold at once, with every node it can add."""
        return sum(k.holds(bundle) * k.count for k in (*self.nodes, *self.addable))

    def gpu_types(self) -> list[str | None]:
        """The kinds of GPU trials can land on, live or addable (None: unnamed)."""
        return sorted({k.gpu_type for k in (*self.nodes, *self.addable) if k.gpus > 0}, key=str)

    def describe_gpus(self) -> str:
        have = f"{self.gpus:g} GPU(s) up"
        if self.addable_gpus:
            have += f"; the autoscaler can add {', '.join(f'{k.name} x{k.count} ({k.gpus:g} GPU)' for k in self.addable if k.gpus)} ({self.autoscaler})"
        return have


def local_view(num_cpus: int | None = None) -> ClusterView:
    """The Ray kdray would start on this machine: its CPUs, and its GPUs (or, in a simulation,
    `KDRAY_SIMULATE_GPUS` logical ones). Read before Ray starts, so a placement this machine can
    never hold exits before Ray does."""
    cpus = float(num_cpus or os.cpu_count() or 1)
    return ClusterView((NodeKind("this machine", cpus, float(local_gpu_count())),), local=True)


def local_gpu_count() -> int:
    """GPUs a local Ray gets on this machine: torch's count, or the simulation's logical ones."""
    if simulated():
        return simulated_local_gpus()
    import torch

    return torch.cuda.device_count()


def read_view() -> ClusterView:
    """The joined cluster (Ray must be running): live nodes, and the node types its autoscaler
    can start."""
    import ray

    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        r = n["Resources"]
        gpu_type = next((k.split(":", 1)[1] for k in r if k.startswith("accelerator_type:")), None)
        nodes.append(NodeKind(n["NodeID"], r.get("CPU", 0.0), r.get("GPU", 0.0), gpu_type))
    addable, source = _gcs_node_types()
    if source is None:
        addable, source = launcher_node_types(LAUNCHER_CONFIG.expanduser())
    return ClusterView(tuple(nodes), addable, source)


def _gcs_node_types() -> tuple[tuple[NodeKind, ...], str | None]:
    """The node groups an autoscaler reported to the GCS (KubeRay's and autoscaler v2's
    `ReportClusterConfig`; what Ray Data's own autoscaling reads)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # a private API: an older or newer Ray may lack it
        return (), None
    if config is None or not config.node_group_configs:
        return (), None
    kinds = []
    for g in config.node_group_configs:
        res = dict(g.resources)
        count = UNBOUNDED if g.max_count < 0 else int(g.max_count)
        kinds.append(NodeKind(g.name, float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                              next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None),
                              count, live=False))
    return tuple(k for k in kinds if k.count > 0), "the node groups the autoscaler reported"


def launcher_node_types(path: Path) -> tuple[tuple[NodeKind, ...], str | None]:
    """The worker node types of a Ray cluster launcher config (`available_node_types`, the
    head's type left out), when `path` is one."""
    import yaml

    if not path.is_file():
        return (), None
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return (), None
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    kinds = []
    for name, spec in types.items():
        if name == head or not isinstance(spec, dict):
            continue
        res = spec.get("resources") or {}
        count = int(spec.get("max_workers", config.get("max_workers", 0)) or 0)
        gpu_type = next((k.split(":", 1)[1] for k in res if str(k).startswith("accelerator_type:")), None)
        if count > 0:
            kinds.append(NodeKind(name, float(res.get("CPU", 0)), float(res.get("GPU", 0)), gpu_type, count, False))
    return tuple(kinds), str(path)


@dataclass(frozen=True)
class Plan:
    """What each process of one role holds, and why."""

    role: str
    """`teacher` or `students`."""
    resources: ResourcesConfig
    """As the engine uses them: `gpus_per_worker > 0` exactly on GPUs."""
    note: str
    """Why, in the words the run prints."""
    per_gpu: int = 1
    """Students sharing one GPU (1 on CPUs, for the teacher and for DDP ranks)."""
    memory: dict[str, Any] = field(default_factory=dict)
    """The memory probe's figures per GPU type (`kdray.evaluate.memory`), when one ran."""
    node_cpus: float = 1.0
    """The CPUs of the largest live node: what a measuring task on CPUs holds (`kdray.runtime.tasks`)."""
    as_configured: bool = False
    """The share is the config's own `gpus_per_worker`, used as given."""

    @property
    def on_gpu(self) -> bool:
        return self.resources.gpus_per_worker > 0

    @property
    def bundle(self) -> dict[str, float]:
        """One worker's Ray resources."""
        r = self.resources
        return {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if self.on_gpu else {})}

    def line(self, precision: str) -> str:
        from kdray.train.precision import describe_precision

        sim = " [SIMULATION: logical GPUs, computing on the CPU]" if self.on_gpu and simulated() else ""
        return (f"resources ({self.role}): {self.note}; "
                f"{describe_precision(precision, 'cuda' if self.on_gpu else 'cpu')}{sim}")


def wants_gpu(res: ResourcesConfig, view: ClusterView, field_name: str) -> bool:
    """Whether a role of `res` trains on GPUs in `view`; a `UserError` for `device: gpu` on a
    cluster that has none and can add none."""
    if res.device == "cpu":
        return False
    if res.gpus_per_worker > 0:
        if view.gpus == 0 and not view.addable_gpus and not view.gpus_can_join:
            raise UserError(f"{field_name}.gpus_per_worker: {res.gpus_per_worker:g}, but this Ray has no GPU and "
                            f"no GPU node can join. Fix: --set {field_name}.gpus_per_worker=0 (CPUs), or join a "
                            f"cluster with GPUs (--address).")
        return True
    if view.gpus > 0 or view.addable_gpus > 0:
        return True
    if res.device == "gpu":
        if view.gpus_can_join:
            return True  # nothing says which nodes will join: wait for GPU ones (`wait_for_gpus`)
        why = ("this machine has no GPU" if view.local else
               f"no GPU node is up and the autoscaler can add none ({view.autoscaler})")
        raise UserError(f"{field_name}.device: gpu, but {why}. Fix: --set {field_name}.device=auto (CPUs here), "
                        f"or join a cluster with GPUs (--address).")
    return False


def plan_role(res: ResourcesConfig, view: ClusterView, *, role: str, concurrency: int,
              field_name: str = "resources") -> Plan:
    """The plan of one role before any memory is measured: the device, whole GPUs for the teacher
    and for DDP ranks, one whole GPU per student (shares come from `spread_students`), and on
    CPUs the workers' share trimmed so `concurrency` trials fit (`_cpu_share`)."""
    _check_share(res, field_name)
    node_cpus = max([1.0, *(n.cpus for n in view.nodes)])
    if not wants_gpu(res, view, field_name):
        why = "device: cpu" if res.device == "cpu" else "no GPU in the cluster"
        res = dataclasses.replace(res, gpus_per_worker=0.0)
        res = _cpu_share(res, concurrency, view)
        return Plan(role, res, f"CPU ({why}), {res.cpus_per_worker:g} CPU per worker", node_cpus=node_cpus)
    if res.gpus_per_worker > 0:
        return Plan(role, res, f"{res.gpus_per_worker:g} GPU per worker, as configured ({view.describe_gpus()})",
                    node_cpus=node_cpus, as_configured=True)
    whole = dataclasses.replace(res, gpus_per_worker=1.0)
    what = "rank" if res.workers > 1 else ("worker" if role == "teacher" else "trial until the memory probe")
    return Plan(role, whole, f"1 whole GPU per {what} ({view.describe_gpus()})", node_cpus=node_cpus)


def _check_share(res: ResourcesConfig, field_name: str) -> None:
    """Several DDP ranks need whole GPUs: a fractional share puts two ranks on one GPU."""
    g = res.gpus_per_worker
    if res.workers > 1 and g > 0 and g != int(g):
        raise UserError(f"{field_name}.gpus_per_worker: {g:g} with {field_name}.workers {res.workers}: Ray places "
                        f"fractional GPU bundles on the fullest GPU that fits them, so DDP ranks would share a "
                        f"GPU, which NCCL refuses. Fix: --set {field_name}.gpus_per_worker=1 (one GPU per rank), or "
                        f"{field_name}.workers=1 to share GPUs between trials.")


def _cpu_share(res: ResourcesConfig, concurrency: int, view: ClusterView) -> ResourcesConfig:
    """Per-worker CPUs such that `concurrency` several-worker trials, drivers included, fit the
    cluster at once.

    Each such trial's process takes 0.01 CPU on top of its workers, so on 2 CPUs two trials of
    one 1-CPU worker would need 2.02 and the second would wait forever for its worker group.
    Shave the workers' share (0.98 CPU still runs one thread) rather than oversubscribe. The
    share leaves room on one node for every trial's process: Ray tends to place the small ones
    together. One-worker trials hold their worker's share themselves and need no shaving.
    """
    total = sum(n.cpus for n in view.nodes)
    need = concurrency * (res.workers * res.cpus_per_worker + TRIAL_DRIVER_CPU)
    if res.workers == 1 or total <= 0 or need <= total:
        return res
    largest = max(n.cpus for n in view.nodes)
    share = int((min(total / concurrency, largest) - concurrency * TRIAL_DRIVER_CPU) / res.workers * 100) / 100
    if share < 0.5:
        return res  # far too small a cluster for this concurrency: trials will queue
    print(f"resources: {concurrency} trials x ({res.workers} x {res.cpus_per_worker:g} CPU + "
          f"{TRIAL_DRIVER_CPU} for the trial) exceed the cluster's {total:g} CPUs; using {share:g} CPU per worker")
    return dataclasses.replace(res, cpus_per_worker=share)


def spread_students(plan: Plan, view: ClusterView, concurrency: int, fits_per_gpu: dict[str, int],
                    memory: dict[str, Any] | None = None) -> Plan:
    """One-worker students on GPUs: the share each trial holds.

    `fits_per_gpu` is, per GPU type, how many students fit one GPU's free memory (the probe).
    A trial can land on any of them, so the smallest decides. The share is 1/k with k =
    ceil(concurrency / GPUs the cluster can have), at most the memory's count: as many GPUs as
    trials gives each its own GPU."""
    if not plan.on_gpu or plan.resources.workers > 1 or plan.as_configured:
        return plan
    gpus = max(1.0, view.gpus + view.addable_gpus)
    fits = max(1, min(MAX_STUDENTS_PER_GPU, *fits_per_gpu.values())) if fits_per_gpu else 1
    k = max(1, min(fits, math.ceil(concurrency / gpus)))
    share = 1.0 if k == 1 else int(100 / k) / 100
    at_once = int(k * gpus)
    memory_note = f"memory fits {fits} per GPU" if fits_per_gpu else "memory not measured"
    note = (f"{'a whole GPU per trial' if k == 1 else f'{k} trials per GPU ({share:g} GPU each)'}: "
            f"{concurrency} at once over {gpus:g} GPU(s) before any GPU holds {k + 1}; {memory_note}"
            f"{'' if concurrency <= at_once else f'; {concurrency - at_once} trial(s) wait for room'}")
    return dataclasses.replace(plan, resources=dataclasses.replace(plan.resources, gpus_per_worker=share), note=note,
                               per_gpu=k, memory=memory or {})


@dataclass(frozen=True)
class RunPlan:
    """The plans of a run's two roles, on the cluster they were made for."""

    view: ClusterView
    teacher: Plan
    students: Plan

    @property
    def on_gpu(self) -> bool:
        return self.teacher.on_gpu or self.students.on_gpu


def plan_run(cfg: Any, view: ClusterView, *, check: bool = True) -> RunPlan:
    """The teacher's and the students' plans for `cfg` (a `RunConfig`) on `view`: a `UserError`
    (exit 2) for a device the cluster can never give, and (`check`) for a placement it can never
    hold (`check_placements`)."""
    teacher_section = "teacher.resources" if cfg.teacher.resources is not None else "resources"
    teacher = plan_role(cfg.teacher.resources or cfg.resources, view, role="teacher", concurrency=1,
                        field_name=teacher_section)
    students = plan_role(cfg.resources, view, role="students", concurrency=cfg.search.concurrency)
    if check:
        check_placements([(teacher, teacher_section), (students, "resources")], view)
    return RunPlan(view, teacher, students)


def check_placements(plans: list[tuple[Plan, str]], view: ClusterView) -> None:
    """Refuse, before any Tune run, a plan the cluster can never hold, now or with every node its
    autoscaler can add (a cluster that names no autoscaler is what is up): `(plan, its config
    section)` each. A trial of several workers needs all its workers' bundles at once; Ray Train
    would otherwise retry starting the worker group forever, and say nothing."""
    problems = []
    for plan, section in plans:
        bundle, workers = plan.bundle, plan.resources.workers
        room = view.capacity(bundle)
        if room < workers:
            have = ("this machine" if view.local else "the cluster") + f" ({_describe(view)})"
            problems.append(f"{section}: {plan.role} trials need {workers} worker(s) of {_bundle_text(bundle)} at "
                            f"once, and {have} holds {room}. Fix: {_fix_for(plan, section, room)}.")
    if problems:
        raise UserError(problems)


def _bundle_text(bundle: dict[str, float]) -> str:
    return " + ".join(f"{v:g} {k}" for k, v in bundle.items())


def _describe(view: ClusterView) -> str:
    cpus = sum(n.cpus for n in view.nodes)
    text = f"{len(view.nodes)} node(s), {cpus:g} CPU, {view.gpus:g} GPU"
    if view.addable:
        text += f"; can add {', '.join(f'{k.name} x{k.count}' for k in view.addable)}"
    return text


def _fix_for(plan: Plan, section: str, room: int) -> str:
    r = plan.resources
    if plan.on_gpu and r.workers > 1:
        return (f"--set {section}.workers={max(1, room)} (one GPU per rank), or a cluster with {r.workers} GPUs "
                f"(--address)")
    if plan.on_gpu:
        return f"--set {section}.device=cpu, or a cluster with GPUs (--address)"
    return f"--set {section}.cpus_per_worker=1 or fewer {section}.workers, or a larger cluster (--address)"


def wait_for_gpus(view: ClusterView, timeout_s: float, poll_s: float = 2.0) -> ClusterView:
    """Ask the autoscaler for one GPU node and wait until a GPU joins; returns the new view.

    `ray.autoscaler.sdk.request_resources` is the autoscaler's own way to scale ahead of demand
    (a no-op without one: then the GPU nodes are expected to join by themselves, like KubeRay
    worker pods still starting). A `DeviceError` after `timeout_s` (`resources.gpu_wait_s`)."""
    import time

    import ray
    from ray.autoscaler.sdk import request_resources

    if view.gpus > 0:
        return view
    print(f"resources: no GPU node has joined yet ({view.describe_gpus() if view.addable else 'the cluster says nothing of the nodes it can add'}); "
          f"asking the autoscaler for one and waiting up to {timeout_s:.0f}s (resources.gpu_wait_s)", flush=True)
    request_resources(bundles=[{"GPU": 1}])
    start = last = time.monotonic()
    while ray.cluster_resources().get("GPU", 0) == 0:
        now = time.monotonic()
        if now - start > timeout_s:
            raise DeviceError(f"resources.device: no GPU node joined within {timeout_s:.0f}s. Fix: see `ray status` "
                              f"(the autoscaler's node types and quotas), wait longer (--set resources.gpu_wait_s=1800), "
                              f"or run on CPUs (--set resources.device=cpu).")
        if now - last > 30:
            print(f"resources: still waiting for a GPU node ({now - start:.0f}s)", flush=True)
            last = now
        time.sleep(poll_s)
    new = read_view()
    print(f"resources: a GPU node joined after {time.monotonic() - start:.0f}s ({new.gpus:g} GPU(s) up)", flush=True)
    return new


def release_requests() -> None:
    """Withdraw the standing `request_resources` ask, so the autoscaler may scale the GPU nodes
    down once the run's trials are gone."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
    except Exception:  # best effort: the run's work is done
        pass


def hold_local_gpus(root: Path, gpus: int) -> Any:
    """Take this machine's GPUs for a local run: a second local kdray run on the same GPUs would
    start its own Ray, which would also believe it owns every GPU, and both would place trials
    on GPU 0. Returns the open lock file (held until the process ends); a `DeviceError` when
    another run holds it. No lock where there is no GPU (two CPU runs only share cores)."""
    import fcntl

    if gpus <= 0:
        return None
    root.mkdir(parents=True, exist_ok=True)
    lock = open(root / "local-gpus.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise DeviceError(f"another local kdray run ({holder}) holds this machine's {gpus} GPU(s): its Ray and a new "
                          f"one would each place trials on every GPU. Fix: wait for it to end, run this one on CPUs "
                          f"(--set resources.device=cpu), or start one Ray for both (`ray start --head`) and pass "
                          f"--address to each.") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    return lock
