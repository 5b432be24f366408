"""The trial engine: how a job becomes a trained, reported, checkpointed result on Ray.

The teacher, search and final stages all train through `tune_trainable`: a Tune function
trainable that runs an *entry* (`entry(job, data, worker)`, e.g. `distill_entry` or the
teacher's) and reports every epoch to Tune with a checkpoint, so ASHA, `--resume` and the retry
of a trial whose node died work the same for all of them.

- **One worker** (`resources.workers == 1`): the entry runs in the Tune trial's own process,
  which holds the trial's CPU/GPU share, through Ray Train's local mode
  (`TorchTrainer(scaling_config=ScalingConfig(num_workers=0))`). No Train controller and no
  worker group start: that start-up cost ~20-28 s per trial on 2 cores. Inside a Tune trial
  Ray Train's own `ray.train.get_context/report/get_checkpoint` (and so `prepare_model`) raise
  (ray#49454), and local mode runs no RunConfig callbacks: the entry reports to Tune itself
  (`ray.tune.report` with a checkpoint) and resumes from `ray.tune.get_checkpoint()`.
- **Several workers**: the trial launches a `TorchTrainer` whose DDP workers run the entry
  (NCCL on whole GPUs, gloo on CPU), and `TuneReportCallback` forwards rank 0's reports.

Every process takes its device from what Ray gave it (`kdray.runtime.devices.assigned`), not from
`torch.cuda.is_available()`, and reports where it ran (`placement`: node, GPU ids, device; for
several workers, every rank's) with each epoch, so a run shows where each trial trained.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray import metrics as M
from kdray.config import ResourcesConfig
from kdray.runtime.cluster import NODE_ID
from kdray.runtime.devices import GpuBusy
from kdray.runtime.resources import TRIAL_DRIVER_CPU
from kdray.trials import TrialConfig


@dataclass
class Worker:
    """Where an entry runs: its rank, device, how it reports and what it resumes from."""

    rank: int
    world_size: int
    device: Any
    """torch.device of this worker."""
    report: Callable[[dict[str, Any], "str | None"], None]
    """`report(metrics, checkpoint_dir)`: one Tune result (an epoch), with a checkpoint dir or None."""
    prepare_model: Callable[[Any], Any]
    """Moves a model to `device` (and wraps it in DDP with several workers)."""
    checkpoint: Any = None
    """The latest checkpoint of this trial (after a restore or retry), else None."""
    placement: Any = None
    """Where this worker runs (`kdray.runtime.devices.Placement`)."""


@dataclass
class TrialSpec:
    """What every trial of one Tune run shares (handed to the trainable with `tune.with_parameters`,
    so the data goes through the object store once)."""

    entry: Callable[[Any, Any, Worker], Any]
    """Module-level `entry(job, data, worker)`."""
    job: Any
    """The run's template `DistillJob`; a trial's `TrialConfig` (if any) is applied to it."""
    data: Any
    """Object-store reference to the shared read-only inputs."""
    resources: ResourcesConfig
    storage: str
    """Where Train runs of several-worker trials write (`<storage>/trial-<id>`), and `run_one`'s
    Tune experiment."""
    max_failures: int = 0


def tune_trainable(spec: TrialSpec) -> Any:
    """The Tune trainable of `spec`, holding the resources its trials need."""
    from ray import tune

    res = spec.resources
    if res.workers == 1:
        # The trial's process trains: it holds the worker's share.
        held = {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker}
    else:
        held = {"cpu": TRIAL_DRIVER_CPU}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), held)


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """Tune function trainable: one entry run, reported to Tune every epoch."""
    import ray.tune
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from kdray.runtime.devices import forget_torchrun_env

    # Per-epoch INFO lines of Ray Train ("Running in local mode", "Checkpoint successfully
    # created at ...") would drown kdray's own progress lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    job = TrialConfig.of_tune(config).job(spec.job) if config else spec.job
    if spec.resources.workers == 1:
        forget_torchrun_env()  # else local mode waits in init_process_group for ranks that never come
        _set_cpu_threads(spec.resources)
        TorchTrainer(_local_loop, train_loop_config={"spec": spec, "job": job},
                     scaling_config=ScalingConfig(num_workers=0)).fit()
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    fit(ddp_loop, {"spec": spec, "job": job}, name=f"trial-{ray.tune.get_context().get_trial_id()}",
        storage_path=spec.storage, resources=spec.resources, max_failures=spec.max_failures,
        callbacks=[TuneReportCallback()], resume=True)


def _set_cpu_threads(res: ResourcesConfig) -> None:
    """A CPU trial computes with the threads its share pays for (at least one)."""
    import torch

    if res.gpus_per_worker == 0:
        torch.set_num_threads(max(1, int(round(res.cpus_per_worker))))


def _local_loop(config: dict[str, Any]) -> None:
    """Ray Train local mode, in the Tune trial's process: rank 0 of 1, reports to Tune."""
    import ray.tune

    from kdray.runtime.devices import assigned, release_cached_memory

    spec, where = config["spec"], assigned()
    device = where.torch_device()
    sampler = GpuBusy(device)
    worker = Worker(0, 1, device, _reporter(tune_report, [where.as_dict()], sampler),
                    lambda model: model.to(device), ray.tune.get_checkpoint(), where)
    try:
        spec.entry(config["job"], _get(spec.data), worker)
    finally:
        sampler.stop()
        release_cached_memory(device)  # a reused trial process must not keep this trial's reserve


def ddp_loop(config: dict[str, Any]) -> None:
    """Ray Train worker of a several-worker run (DDP): every rank on its own device."""
    import ray.train
    import torch.distributed as dist

    from kdray.runtime.devices import assigned, release_cached_memory

    spec, ctx, where = config["spec"], ray.train.get_context(), assigned()
    device = where.torch_device()
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    ranks: list = [None] * ctx.get_world_size()
    dist.all_gather_object(ranks, {"rank": ctx.get_world_rank(), **where.as_dict()})
    # This run's own latest checkpoint (after a worker failure) wins over one to start from.
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    sampler = GpuBusy(device)
    worker = Worker(ctx.get_world_rank(), ctx.get_world_size(), device, _reporter(train_report, ranks, sampler),
                    _ddp_wrapper(device), checkpoint, where)
    try:
        spec.entry(config["job"], _get(spec.data), worker)
    finally:
        sampler.stop()
        release_cached_memory(device)


def _ddp_wrapper(device: Any) -> Callable[[Any], Any]:
    """Move a model to this rank's device and wrap it in DDP (Ray's `prepare_model` would move
    it to `get_device()`, which is not the device kdray decided on in every case)."""
    def prepare(model: Any) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(device)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    return prepare


def _reporter(send: Callable[[dict, "str | None"], None], ranks: list[dict], sampler: "GpuBusy"
              ) -> Callable[[dict, "str | None"], None]:
    """A `Worker.report` that adds where the trial ran (`placement`: each rank's node, GPU ids
    and device, as JSON) and its GPU's busy share over the epoch."""
    placement = json.dumps(ranks)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        send({**metrics, M.PLACEMENT: placement, **sampler.epoch()}, checkpoint_dir)

    return report


def _get(data: Any) -> Any:
    import ray

    return ray.get(data) if isinstance(data, ray.ObjectRef) else data


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def tune_report(metrics: dict, checkpoint_dir: str | None) -> None:
    """A `Worker.report` straight to Tune (one-worker trials). Adds the Ray node id (`node_id`:
    where the trial trained, which Tune's own `node_ip` is not)."""
    import ray.tune

    ckpt = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
    ray.tune.report({**metrics, NODE_ID: _node_id()}, checkpoint=ckpt)


def train_report(metrics: dict, checkpoint_dir: str | None) -> None:
    """A `Worker.report` to Ray Train (several workers; rank 0's reaches Tune)."""
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
    ray.train.report({**metrics, NODE_ID: _node_id()}, checkpoint=ckpt)


def fit(loop: Callable[[dict], None], config: dict, *, name: str, storage_path: str | os.PathLike,
        resources: ResourcesConfig, max_failures: int = 0, callbacks: list | None = None,
        resume: bool = False) -> Any:
    """Run `loop(config)` on a `TorchTrainer`'s workers; return the Train `Result` (raises on failure).

    Ray Train resumes any earlier run under the same (storage_path, name), even a finished one.
    So `name` gets a unique suffix unless `resume`: a trial keeps its name, and a trial
    restarted after its driver was killed continues from its last epoch checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kdray.runtime.devices import simulated

    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    run_name = name if resume else f"{name}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        # A simulation's logical GPUs compute on the CPU, where NCCL cannot run.
        torch_config=TorchConfig(backend="gloo") if use_gpu and simulated() else None,
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=run_name,
            storage_path=_absolute(storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def distill_entry(job: Any, data: Any, worker: Worker) -> Any:
    """The entry of a distillation trial: `kdray.train.loop.distill` on this worker, resumed from the
    worker's checkpoint if it has one. Returns the `DistillResult`."""
    from kdray.train.loop import distill

    kw = dict(rank=worker.rank, world_size=worker.world_size, device=worker.device,
              prepare_model=worker.prepare_model)
    if worker.checkpoint is None:
        return distill(job, data, worker.report, **kw)
    with worker.checkpoint.as_directory() as d:
        return distill(job, data, worker.report, resume_from=d, **kw)


def distill_spec(cfg: Any, job: Any, data: Any, storage: str, resources: ResourcesConfig) -> TrialSpec:
    """The spec of a stage's distillation trials (the search's, the final stage's): `job` and the
    `DistillData` put in the object store once, each trial holding `resources` (the students'
    `kdray.runtime.resources.Plan`), several-worker runs under `storage`."""
    import ray

    return TrialSpec(distill_entry, job, ray.put(data), resources, storage, cfg.search.max_failures)


def tune_run_config(name: str, storage: str | os.PathLike, *, keep: int, max_failures: int,
                    callbacks: list | None = None) -> Any:
    """The Tune `RunConfig` of every kdray experiment: `<storage>/<name>`, the last `keep`
    checkpoints of each trial, `max_failures` retries from the last checkpoint."""
    from ray import tune

    # Snapshot the experiment at every step, not every ~10 s: a search killed right after a
    # trial finished must not run that trial again on --resume. Tune warns when snapshots are
    # that frequent; they are, on purpose.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return tune.RunConfig(name=name, storage_path=_absolute(storage), callbacks=callbacks, verbose=0,
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
                          failure_config=tune.FailureConfig(max_failures=max_failures))


def run_one(spec: TrialSpec, name: str) -> Any:
    """Run `spec`'s job as a single Tune trial (the teacher stage, one distillation) whose
    experiment goes under `spec.storage`; return its Tune `Result`."""
    from ray import tune

    from kdray.runtime.progress import EpochLines

    run_config = tune_run_config(f"{name}-{uuid.uuid4().hex[:8]}", spec.storage, keep=1,
                                 max_failures=spec.max_failures, callbacks=[EpochLines(name.split("-")[0])])
    (result,) = tune.Tuner(tune_trainable(spec), run_config=run_config).fit()
    if result.error is not None:
        raise result.error
    return result


def _absolute(storage: str | os.PathLike) -> str:
    return str(Path(storage).resolve()) if "://" not in str(storage) else str(storage)


def checkpoint_path(result: Any) -> str | None:
    """The latest checkpoint of a Tune `Result`: Tune's own (one-worker trials), or the Train
    run's that `TuneReportCallback` forwarded (several workers)."""
    if result.checkpoint is not None:
        return result.checkpoint.path
    return (result.metrics or {}).get("checkpoint_path")
