"""Ray plumbing shared by the stages that talk to Ray: start or join a cluster, and where a
run's experiments and checkpoints go. How a job trains on Ray is `kdray.runtime.engine`.

Local runs start Ray with the dashboard on and bound to 127.0.0.1 when they train on several
workers: Ray Train frees the workers of a stopped trial through the state API the dashboard
serves, and without it the next trial waits forever (shared RAY_NOTES.md). Runs whose every
trial trains on one worker start no worker group and skip the dashboard's start-up.
`address` / `$RAY_ADDRESS` joins an existing cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdray.errors import UserError


def cluster_address(address: str | None) -> tuple[str | None, str]:
    """The cluster to join and where that came from: `--address`, else `$RAY_ADDRESS`, else
    (None, "") for a local Ray."""
    if address:
        return address, "--address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return None, ""


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """A `UserError` unless something answers at the cluster address (`--address` or
    `$RAY_ADDRESS`); checked before anything else starts. `ray.init` itself would retry an
    unreachable address for minutes and then raise a raw traceback."""
    import socket

    target, source = cluster_address(address)
    if target is None or target in ("auto", "local"):
        return
    scheme, _, rest = target.rpartition("://")
    hostport = rest.split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    default_port = {"ray": 10001, "http": 8265, "https": 443}.get(scheme, 6379)
    if not host:
        host, port = hostport, ""
    try:
        with socket.create_connection((host, int(port) if port else default_port), timeout=timeout_s):
            return
    except (OSError, ValueError) as e:
        why = "nothing answers there" if isinstance(e, ConnectionRefusedError) else str(e) or type(e).__name__
        raise UserError(f"{source} {target}: cannot reach a Ray cluster there ({why}). Fix: check the address "
                        f"(the head's HOST:6379, or ray://HOST:10001), start the cluster with `ray start --head`, "
                        f"or drop --address and unset RAY_ADDRESS to start a local Ray.") from None


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Start a local Ray (dashboard on 127.0.0.1) or join `address` / `$RAY_ADDRESS`.
    `dashboard=False` starts a local Ray without it, ~4 s sooner: for jobs whose every trial
    trains on one worker (in the trial's own process), which start no Train worker group for
    the dashboard to free (`needs_dashboard`). A local Ray gets this machine's GPUs (a
    simulation's logical ones: `kdray.runtime.devices`), which this run then holds against other local
    runs (`kdray.runtime.resources.hold_local_gpus`)."""
    import ray

    if ray.is_initialized():
        return
    check_address(address)
    from kdray.cache import cache_root
    from kdray.console import VERBOSE_ENV, ray_init_options
    from kdray.runtime.devices import SIMULATE_ENV, SIMULATED_MEMORY_ENV, refuse_simulation_on_real_gpus
    from kdray.runtime.resources import hold_local_gpus, local_gpu_count

    refuse_simulation_on_real_gpus()
    forwarded = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SILENT", "KDRAY_CACHE", "HF_HOME", "TRANSFORMERS_VERBOSITY",
                 "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", VERBOSE_ENV, SIMULATE_ENV,
                 SIMULATED_MEMORY_ENV)
    # Under `ray job submit` the job's own runtime env already reaches every worker, and Ray
    # refuses a driver runtime env that sets one of its variables again.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}) or {}
    env = {k: os.environ[k] for k in forwarded if k in os.environ and k not in job_env.get("env_vars", {})}
    # A process that holds no GPU gets CUDA_VISIBLE_DEVICES="" from Ray itself (as before Ray
    # 2.60, ray#54868); `kdray.runtime.devices.assigned` hides them too, for processes Ray starts otherwise.
    if ZERO_GPU_ENV not in job_env.get("env_vars", {}):
        env[ZERO_GPU_ENV] = "1"
    runtime_env = {"env_vars": env}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, **ray_init_options())
    else:
        gpus = local_gpu_count()
        _LOCAL_LOCKS.append(hold_local_gpus(cache_root() / "locks", gpus))
        ray.init(num_cpus=num_cpus, num_gpus=gpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 runtime_env=runtime_env, **ray_init_options())
#: Ray's switch back to setting CUDA_VISIBLE_DEVICES="" for processes that hold no GPU.
ZERO_GPU_ENV = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"
#: The local GPU lock of this process's Ray, held until the process ends.
_LOCAL_LOCKS: list = []


def start(cfg: Any, address: str | None, *, dashboard: bool | None = None, num_cpus: int | None = None) -> Any:
    """Start or join Ray for a run of `cfg`, and plan where its teacher and trials train
    (`kdray.runtime.resources.RunPlan`). A local run is planned from this machine before Ray starts, so
    a placement it can never hold exits 2 with nothing started; a joined cluster is read once
    Ray is up, and a plan that needs GPUs the cluster has not started yet waits for them."""
    from kdray.runtime.resources import local_view, plan_run, read_view, wait_for_gpus

    dashboard = needs_dashboard(cfg) if dashboard is None else dashboard
    if cluster_address(address)[0] is None:
        plan = plan_run(cfg, local_view(num_cpus))
        init_ray(None, num_cpus=num_cpus, dashboard=dashboard)
        return plan
    init_ray(address, dashboard=dashboard)
    view = read_view()
    plan = plan_run(cfg, view, check=False)
    if plan.on_gpu and view.gpus == 0:  # GPU nodes still to come: wait for the first, then check
        roles = [r for r, p in ((cfg.teacher.resources or cfg.resources, plan.teacher), (cfg.resources, plan.students))
                 if p.on_gpu]
        view = wait_for_gpus(view, max(r.gpu_wait_s for r in roles))
    return plan_run(cfg, view)


def needs_dashboard(cfg: Any) -> bool:
    """Whether a run of `cfg` (a `RunConfig`) starts Ray Train worker groups: trials or a
    teacher with several workers. Their placement groups are freed through the dashboard."""
    return max(cfg.resources.workers, (cfg.teacher.resources or cfg.resources).workers) > 1


NODE_ID = "node_id"


def storage_root(cfg: Any, run_dir: Path) -> str:
    """Where Ray writes this run's experiments and checkpoints: `<storage_path>/<name>`, or the
    run directory when no `storage_path` is set (one machine)."""
    if cfg.storage_path is None:
        return str(run_dir)
    return f"{cfg.storage_path.rstrip('/')}/{cfg.name}"


def storage_join(root: str, *parts: str) -> str:
    """`root/part/...` for a local path or a URI alike."""
    return "/".join([root.rstrip("/"), *parts])


def warn_if_storage_is_local(cfg: Any) -> None:
    """On a cluster of several nodes, checkpoints written to a local path stay on the node that
    wrote them: a retried trial could not resume and the final stage could not load them."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and cfg.storage_path is None:
        print(f"warning: {len(nodes)} Ray nodes and no --storage-path: trial checkpoints go to the run directory "
              f"on whichever node trains, which only works if every node shares this file system. Fix: "
              f"--storage-path s3://BUCKET/PREFIX (or a path every node mounts).", flush=True)
