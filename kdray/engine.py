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
  (`ray.tune.report` with a checkpoint) and resumes from `ray.tune.get_checkpoint()`;
  `ray.train.torch.get_device()` gives the trial's device (RAY_NOTES.md).
- **Several workers**: the trial launches a `TorchTrainer` whose DDP workers run the entry
  (NCCL on whole GPUs, gloo on CPU), and `TuneReportCallback` forwards rank 0's reports.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray import metrics as M
from kdray.cluster import NODE_ID
from kdray.config import ResourcesConfig
from kdray.trials import TrialConfig, shape_note

#: CPU the trial's own process holds when its Train workers do the work (several workers):
#: it must not hold the CPUs its workers need, and Ray refuses 0 (RAY_NOTES.md).
TRIAL_DRIVER_CPU = 0.01


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


# ----------------------------------------------------------------------------- the trainable


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

    # Per-epoch INFO lines of Ray Train ("Running in local mode", "Checkpoint successfully
    # created at ...") would drown kdray's own progress lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    job = TrialConfig.of_tune(config).job(spec.job) if config else spec.job
    if spec.resources.workers == 1:
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
    import ray.train.torch
    import ray.tune

    spec, device = config["spec"], ray.train.torch.get_device()
    worker = Worker(0, 1, device, tune_report, lambda model: model.to(device), ray.tune.get_checkpoint())
    spec.entry(config["job"], _get(spec.data), worker)


def ddp_loop(config: dict[str, Any]) -> None:
    """Ray Train worker of a several-worker run (DDP)."""
    import ray.train
    import ray.train.torch

    spec, ctx = config["spec"], ray.train.get_context()
    # This run's own latest checkpoint (after a worker failure) wins over one to start from.
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    worker = Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), train_report,
                    ray.train.torch.prepare_model, checkpoint)
    spec.entry(config["job"], _get(spec.data), worker)


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
    from ray.train.torch import TorchTrainer

    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    run_name = name if resume else f"{name}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
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
    """The entry of a distillation trial: `kdray.loop.distill` on this worker, resumed from the
    worker's checkpoint if it has one. Returns the `DistillResult`."""
    from kdray.loop import distill

    kw = dict(rank=worker.rank, world_size=worker.world_size, device=worker.device,
              prepare_model=worker.prepare_model)
    if worker.checkpoint is None:
        return distill(job, data, worker.report, **kw)
    with worker.checkpoint.as_directory() as d:
        return distill(job, data, worker.report, resume_from=d, **kw)


def distill_spec(cfg: Any, job: Any, data: Any, storage: str, largest: Any) -> TrialSpec:
    """The spec of a stage's distillation trials (the search's, the final stage's): `job` and the
    `DistillData` put in the object store once, resources sized for `cfg` (on a GPU from one
    step of `largest`, the stage's most memory-hungry job), several-worker runs under `storage`."""
    import ray

    resources = trial_resources(cfg.resources, cfg.search.concurrency, probe=gpu_probe(largest, cfg.data.max_length),
                                precision=cfg.train.precision)
    return TrialSpec(distill_entry, job, ray.put(data), resources, storage, cfg.search.max_failures)


# ----------------------------------------------------------------------------- resources

#: Memory a CUDA process holds beyond its tensors (context, kernels, allocator slack).
CUDA_PROCESS_OVERHEAD = 600 * 2**20
#: More students than this on one GPU starve on the host side (one CPU-bound loop each).
MAX_STUDENTS_PER_GPU = 8


def students_per_gpu(peak_bytes: int, gpu_bytes: int) -> int:
    """How many student trials fit one GPU: 90% of its memory over one trial's measured peak
    plus its process overhead; at least 1, at most `MAX_STUDENTS_PER_GPU`."""
    fits = int(0.9 * gpu_bytes // (peak_bytes + CUDA_PROCESS_OVERHEAD))
    return max(1, min(MAX_STUDENTS_PER_GPU, fits))


def trial_resources(res: ResourcesConfig, concurrency: int, *, role: str = "student",
                    probe: Callable[[], tuple[int, int]] | None = None, precision: str = "auto") -> ResourcesConfig:
    """The resources each trial of `role` (`student` or `teacher`) runs with, printed with what
    its `precision` (`TrainConfig.precision`) trains in there.

    `gpus_per_worker > 0` is used as given. Otherwise, with `device: auto` and GPUs in the
    cluster (or `device: gpu`): the teacher and DDP ranks get whole GPUs (NCCL refuses two ranks
    on one GPU, ray#48012); one-worker students share a GPU, as many as `probe()` (peak bytes of
    one training step of the largest student, the GPU's bytes) says fit. Else CPUs, with the
    workers' share of several-worker trials trimmed so `concurrency` trials fit (`_cpu_share`).
    """
    import ray

    from kdray.errors import UserError
    from kdray.loop import describe_precision

    gpus = ray.cluster_resources().get("GPU", 0.0)
    on_gpu = f"; {describe_precision(precision, 'cuda')}"
    if res.gpus_per_worker > 0:
        print(f"resources ({role}): {res.gpus_per_worker:g} GPU per worker, as configured{on_gpu}", flush=True)
        return res
    if res.device == "gpu" and gpus == 0:
        raise UserError("resources.device: gpu, but the Ray cluster has no GPU. Fix: device: auto (CPUs here), "
                        "or join a cluster with GPUs (--address).")
    if res.device == "cpu" or gpus == 0:
        why = "device: cpu" if res.device == "cpu" else "no GPU visible to Ray"
        res = _cpu_share(res, concurrency)
        print(f"resources ({role}): CPU ({why}), {res.cpus_per_worker:g} CPU per worker; "
              f"{describe_precision(precision, 'cpu')}", flush=True)
        return res
    if role == "teacher" or res.workers > 1 or probe is None:
        print(f"resources ({role}): 1 whole GPU per worker ({gpus:g} GPU(s) in the cluster){on_gpu}", flush=True)
        return dataclasses.replace(res, gpus_per_worker=1.0)
    peak, total = probe()
    k = students_per_gpu(peak, total)
    print(f"resources ({role}): {k} trials per GPU (one training step of the largest student peaks at "
          f"{peak / 2**20:.0f} MiB of {total / 2**30:.0f} GiB), {gpus:g} GPU(s): up to {int(k * gpus)} trials at once"
          f"{'' if concurrency >= k * gpus else f'; search.concurrency {concurrency} leaves GPU room idle'}{on_gpu}",
          flush=True)
    return dataclasses.replace(res, gpus_per_worker=int(100 / k) / 100)


def _cpu_share(res: ResourcesConfig, concurrency: int) -> ResourcesConfig:
    """Per-worker CPUs such that `concurrency` several-worker trials, drivers included, fit the
    cluster at once.

    Each such trial's process takes 0.01 CPU on top of its workers, so on 2 CPUs two trials of
    one 1-CPU worker would need 2.02 and the second would wait forever for its worker group.
    Shave the workers' share (0.98 CPU still runs one thread) rather than oversubscribe. The
    share leaves room on one node for every trial's process: Ray tends to place the small ones
    together. One-worker trials hold their worker's share themselves and need no shaving.
    """
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    need = concurrency * (res.workers * res.cpus_per_worker + TRIAL_DRIVER_CPU)
    if res.workers == 1 or total <= 0 or need <= total:
        return res
    largest = max(node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive"))
    share = int((min(total / concurrency, largest) - concurrency * TRIAL_DRIVER_CPU) / res.workers * 100) / 100
    if share < 0.5:
        return res  # far too small a cluster for this concurrency: trials will queue
    print(f"resources: {concurrency} trials x ({res.workers} x {res.cpus_per_worker:g} CPU + "
          f"{TRIAL_DRIVER_CPU} for the trial) exceed the cluster's {total:g} CPUs; using {share:g} CPU per worker")
    return dataclasses.replace(res, cpus_per_worker=share)


def gpu_probe(job: Any, max_length: int) -> Callable[[], tuple[int, int]]:
    """`probe()` for `trial_resources`: one training step of `job`'s student at its batch size
    and `max_length` tokens on one GPU, in a Ray task; returns (peak bytes, GPU bytes)."""
    def probe() -> tuple[int, int]:
        import ray

        return ray.get(ray.remote(num_gpus=1, num_cpus=0)(_peak_memory).remote(job, max_length))

    return probe


def _peak_memory(job: Any, max_length: int) -> tuple[int, int]:
    import torch

    from kdray.loop import autocast_for, kd_loss
    from kdray.models import build_student

    device = torch.device("cuda")
    model = build_student(job.model, job.num_labels, job.label_names, seed=job.seed).to(device).train()
    b = job.train.batch_size
    ids = torch.randint(1000, 2000, (b, max_length), device=device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with autocast_for(device, job.train.precision):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    loss, _, _ = kd_loss(logits, torch.zeros(b, dtype=torch.long, device=device), logits.detach(), 0.5, 2.0)
    loss.backward()
    adam_state = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # not made by one step
    peak = torch.cuda.max_memory_allocated(device) - base + adam_state
    return int(peak), int(torch.cuda.get_device_properties(device).total_memory)


# ----------------------------------------------------------------------------- one run, and the results


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

    run_config = tune_run_config(f"{name}-{uuid.uuid4().hex[:8]}", spec.storage, keep=1,
                                 max_failures=spec.max_failures, callbacks=[epoch_lines(name.split("-")[0])])
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


def progress_callback(label: Callable[[Any], str] | None = None, *, total: int | None = None,
                      concurrency: int = 1) -> Any:
    """One concise line per trial epoch and per finished trial; `label(trial)` names a trial in
    the first column (default: its id). When a trial ends, a status line: trials done, running
    and pending out of `total`, the best validation accuracy so far, elapsed time and an ETA
    (the finished trials' mean wall time over the pending and running work, `concurrency` at once).

    Lines are printed at the end of Tune's step, after it has taken its experiment snapshot
    (whose copy to the storage path may still be under way: RAY_NOTES.md)."""
    import time

    from ray.tune import Callback

    label = label or (lambda trial: trial.trial_id)

    class Progress(Callback):
        def __init__(self) -> None:
            self.header = False
            self.pending: list[str] = []
            self.t0 = time.monotonic()
            self.started: dict[str, float] = {}
            self.walls: list[float] = []
            self.best: tuple[tuple[float, int], str] | None = None  # ((accuracy, -params), label)
            self.recovering: set[str] = set()
            self.ended: set[str] = set()

        def _line(self, trial: Any, result: dict, status: str) -> None:
            if not self.header:
                self.pending.append(f"{'trial':<16} {'alpha':>5} {'T':>5} {'r':>3} {'layers':<12} {'params':>9} "
                                    f"{'epoch':>5} {'val acc':>7}  status")
                self.header = True
            c = TrialConfig.of_tune(trial.config)
            head = c.mode != "lora"
            acc = result.get(M.VAL_ACCURACY)
            # Ties broken as `kdray.study.best_config` breaks them: fewer trainable parameters.
            if acc is not None and (self.best is None or (acc, -c.trainable_params) > self.best[0]):
                self.best = ((acc, -c.trainable_params), label(trial))
            self.pending.append(
                f"{label(trial):<16} {c.alpha:>5.2f} {c.temperature:>5.2f} {'-' if head else c.lora.r:>3} "
                f"{('all' if head else c.layers_text) + shape_note(c):<12} {c.trainable_params:>9,} "
                f"{result.get(M.EPOCHS_DONE, 0):>5} {acc if acc is None else f'{acc:.4f}':>7}  {status}")

        def _ended(self, trial: Any, trials: list) -> None:
            # Tune marks `trial` TERMINATED only after its callbacks ran: count it here.
            self.ended.add(trial.trial_id)
            now = time.monotonic()
            done = len(self.ended | {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")})
            running = [t for t in trials if t.status == "RUNNING" and t.trial_id not in self.ended]
            n = total if total is not None else len(trials)
            line = f"-- {done}/{n} trials done, {len(running)} running, {max(0, n - done - len(running))} pending"
            if self.best is not None:
                line += f"; best val acc {self.best[0][0]:.4f} ({self.best[1]})"
            line += f"; {_minutes(now - self.t0)} elapsed"
            if self.walls and done < n:
                mean = sum(self.walls) / len(self.walls)
                left = mean * (n - done) - sum(now - self.started.get(t.trial_id, now) for t in running)
                line += f", about {_minutes(max(0.0, left) / max(1, concurrency))} to go"
            self.pending.append(line)

        def _flush(self) -> None:
            if self.pending:
                print("\n".join(self.pending), flush=True)
                self.pending.clear()

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.monotonic()

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.recovering.add(trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if trial.trial_id in self.recovering:  # its first epoch after a retry: where it went on from
                self.recovering.discard(trial.trial_id)
                self.pending.append(f"{label(trial)}: retried after a failure (its node or process died); resumed "
                                    f"after epoch {result.get(M.EPOCHS_DONE, 1) - 1} from its checkpoint")
            if result.get(M.EPOCHS_DONE, 0) < TrialConfig.of_tune(trial.config).epochs:  # else: its end line
                self._line(trial, result, "running")

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            done = result.get(M.EPOCHS_DONE, 0) >= TrialConfig.of_tune(trial.config).epochs
            self._line(trial, result, "completed" if done else "stopped early")
            self.walls.append(time.monotonic() - self.started.get(trial.trial_id, self.t0))
            self._ended(trial, trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, trial.last_result or {}, "failed")
            self._ended(trial, trials)

        def on_step_end(self, iteration, trials, **info):
            self._flush()

        def on_experiment_end(self, trials, **info):
            self._flush()

    return Progress()


def epoch_lines(prefix: str, every_s: float = 10.0) -> Any:
    """A line per epoch of a single-trial run (the teacher stage), printed by the driver (the
    trial's own output stays in its process unless --verbose); at most one per `every_s`
    seconds, so a long teacher shows progress and a quick one only its closing line."""
    import time

    from ray.tune import Callback

    class EpochLines(Callback):
        def __init__(self) -> None:
            self.last = time.monotonic()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if M.EPOCH_SECONDS not in result:  # the closing report (logits), not an epoch
                return
            if time.monotonic() - self.last < every_s:
                return
            self.last = time.monotonic()
            acc = result.get(M.VAL_ACCURACY)
            print(f"{prefix}: epoch {result.get(M.EPOCHS_DONE, '?')}: val acc "
                  f"{'-' if acc is None else f'{acc:.4f}'}, {result.get(M.SAMPLES_PER_S, 0):,.0f} samples/s, "
                  f"{result.get(M.EPOCH_SECONDS, 0):.0f}s", flush=True)

    return EpochLines()


def _minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
