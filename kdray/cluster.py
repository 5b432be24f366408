"""Ray plumbing shared by the stages that talk to Ray: start or join a cluster, run a loop on
Ray Train workers.

Local runs start Ray with the dashboard on and bound to 127.0.0.1: Ray Train frees the workers
of a stopped trial through the state API the dashboard serves, and without it the next trial
waits forever (shared RAY_NOTES.md). `address` / `$RAY_ADDRESS` joins an existing cluster.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdray.config import ResourcesConfig


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a local Ray (dashboard on 127.0.0.1) or join `address` / `$RAY_ADDRESS`."""
    import ray

    if ray.is_initialized():
        return
    forwarded = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SILENT", "KDRAY_CACHE", "HF_HOME", "TRANSFORMERS_VERBOSITY",
                 "HF_HUB_DISABLE_PROGRESS_BARS")
    # Under `ray job submit` the job's own runtime env already reaches every worker, and Ray
    # refuses a driver runtime env that sets one of its variables again.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}) or {}
    env = {k: os.environ[k] for k in forwarded if k in os.environ and k not in job_env.get("env_vars", {})}
    runtime_env = {"env_vars": env} if env else None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=runtime_env, log_to_driver=True)


def add_cluster_arguments(parser: Any, workers: bool = True) -> None:
    """`--address` (and `--workers`) for every command that runs on Ray."""
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start one locally)")
    if workers:
        parser.add_argument("--workers", type=int, help="Ray Train workers (overrides resources.workers)")


def worker_overrides(args: Any) -> list[str]:
    return [f"resources.workers={args.workers}"] if getattr(args, "workers", None) is not None else []


def scaling(resources: ResourcesConfig) -> Any:
    from ray.train import ScalingConfig

    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return ScalingConfig(num_workers=resources.workers, use_gpu=use_gpu, resources_per_worker=per_worker)


def fit(loop: Callable[[dict], None], config: dict, *, name: str, storage_path: str | os.PathLike,
        resources: ResourcesConfig, max_failures: int = 0, callbacks: list | None = None,
        resume: bool = False) -> Any:
    """Run `loop(config)` on Ray Train workers; return the Train `Result` (raises on failure).

    Ray Train resumes any earlier run under the same (storage_path, name), even a finished one.
    So `name` gets a unique suffix unless `resume`: a search trial keeps its name, and a trial
    restarted after its driver was killed continues from its last epoch checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    run_name = name if resume else f"{name}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=scaling(resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(storage_path).resolve()) if "://" not in str(storage_path) else str(storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def worker_context() -> tuple[int, int, Any]:
    """`(rank, world_size, device)` of this Ray Train worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def ray_report(metrics: dict, checkpoint_dir: str | None) -> None:
    """The `report` callable the loops take, for a Ray Train worker. Adds the worker's Ray node
    id (`node_id`: where the trial trained, which Tune's own `node_ip` is not)."""
    import ray
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
    ray.train.report({**metrics, NODE_ID: ray.get_runtime_context().get_node_id()}, checkpoint=ckpt)


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


def prepare_model(model: Any) -> Any:
    """Move to this worker's device and wrap in DDP when there are several workers."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def distill_on_worker(job: Any, data: Any, checkpoint: Any = None) -> Any:
    """Run `kdray.distill.distill` on this Ray Train worker, resuming from `checkpoint` if given.

    Returns the `DistillResult` (the teacher stage goes on with the trained model)."""
    from kdray.distill import distill

    rank, world, device = worker_context()
    if checkpoint is None:
        return distill(job, data, ray_report, rank=rank, world_size=world, device=device, prepare_model=prepare_model)
    with checkpoint.as_directory() as d:
        return distill(job, data, ray_report, rank=rank, world_size=world, device=device, prepare_model=prepare_model,
                       resume_from=d)


def distill_worker(config: dict) -> None:
    """Ray Train entry point of one distillation (a trial): `config` holds the `DistillJob`, an
    object-store reference to the shared `DistillData`, and optionally a `resume_from` Checkpoint."""
    import ray
    import ray.train

    data = config["data"]
    data = ray.get(data) if isinstance(data, ray.ObjectRef) else data
    # This run's own latest checkpoint (after a worker failure) wins over an explicit one to
    # start from (`resume_from`: Train V2 takes it through the loop's config).
    distill_on_worker(config["job"], data, ray.train.get_checkpoint() or config.get("resume_from"))
