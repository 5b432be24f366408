"""The trial engine on a real local Ray cluster: one-worker trials run in the Tune trial's own
process (no Ray Train worker group), several-worker trials on a DDP worker group; two searches
on one machine at once do not break each other."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdray import metrics as M
from kdray.config import load_config
from kdray.train.budget import count
from tests.conftest import ROOT


TRAIN_ACTORS = {"TrainController", "RayTrainWorker"}


@pytest.fixture(scope="module")
def job_and_data(ray_cluster):
    from kdray.data.load import load_data
    from kdray.data.tokenize import tokenize
    from kdray.train.batches import Split
    from kdray.train.logits import TeacherLogits
    from kdray.train.loop import DistillData, DistillJob
    from kdray.train.models import load_tokenizer

    cfg = load_config("smoke", ["data.max_train_samples=256"])
    task = load_data(cfg.data)
    tok = load_tokenizer(cfg.student)
    tokenized, _ = tokenize(task, tok, cfg.data.max_length, cfg.cache_dir)
    train, val = Split.from_dataset(tokenized["train"]), Split.from_dataset(tokenized["validation"])
    table = TeacherLogits(train.example_ids, np.random.default_rng(0).normal(size=(len(train), 2)).astype(np.float32))
    job = DistillJob(cfg.student, dataclasses.replace(cfg.train, epochs=2, alpha=0.5), task.label_names,
                     tok.pad_token_id)
    return cfg, job, ray_cluster.put(DistillData(train, val, table))


def actor_classes() -> dict[str, str]:
    """Every actor the cluster has had (alive or dead): id -> class name."""
    from ray.util.state import list_actors

    return {a.actor_id: a.class_name for a in list_actors(limit=10_000, raise_on_missing_output=False)}


def run_spec(spec, tmp_path: Path, name: str):
    """The spec's job as one Tune trial keeping every epoch's checkpoint."""
    from ray import tune

    from kdray.runtime.engine import tune_run_config, tune_trainable

    grid = tune.Tuner(tune_trainable(spec), run_config=tune_run_config(name, tmp_path, keep=10, max_failures=0)).fit()
    (result,) = grid
    assert result.error is None, result.error
    return result


def test_one_worker_trial_starts_no_train_worker_group_and_reports_every_epoch(job_and_data, tmp_path):
    from kdray.runtime.engine import TrialSpec, distill_entry

    cfg, job, data = job_and_data
    before = actor_classes()
    result = run_spec(TrialSpec(distill_entry, job, data, cfg.resources, str(tmp_path / "train")), tmp_path, "one")
    new = {cls for actor, cls in actor_classes().items() if actor not in before}
    assert not new & TRAIN_ACTORS, new  # Ray Train local mode: the trial's own process trained
    assert new, "the trial's own actor should have been listed"

    df = result.metrics_dataframe
    assert list(df[M.EPOCHS_DONE]) == [1, 2]
    assert all(0 <= a <= 1 for a in df[M.VAL_ACCURACY]) and all(df[M.TRAIN_KD] > 0)
    assert set(df[M.TRAINABLE_PARAMS]) == {count(job.model, job.num_labels)}  # the trial's real model
    # One Tune checkpoint per epoch, each holding the trainable weights and where the run stands.
    checkpoints = sorted(p for p in Path(result.path).glob("checkpoint_*") if p.is_dir())
    assert [json.loads((c / "state.json").read_text())["epochs_done"] for c in checkpoints] == [1, 2]
    assert all((c / "trainable.safetensors").is_file() for c in checkpoints)


def test_two_worker_trial_runs_ddp_through_the_engine(job_and_data, tmp_path):
    from kdray.runtime.engine import TrialSpec, distill_entry

    cfg, job, data = job_and_data
    before = actor_classes()
    resources = dataclasses.replace(cfg.resources, workers=2, cpus_per_worker=0.9)
    result = run_spec(TrialSpec(distill_entry, job, data, resources, str(tmp_path / "train")), tmp_path, "two")
    new = {cls for actor, cls in actor_classes().items() if actor not in before}
    assert TRAIN_ACTORS <= new, new  # a Train controller and its (two) workers
    df = result.metrics_dataframe
    assert list(df[M.EPOCHS_DONE]) == [1, 2] and set(df[M.TRAINABLE_PARAMS]) == {count(job.model, job.num_labels)}
    # The Train run's checkpoint (forwarded by TuneReportCallback) holds both epochs' history.
    state = json.loads((Path(df["checkpoint_path"].iloc[-1]) / "state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2]


# ----------------------------------------------------------------------------- resources


def test_resources_follow_the_cluster_without_a_gpu(ray_cluster, capsys):
    """The plan read from the running cluster (no GPU): CPUs, said once with what the trials
    train in; an explicit GPU share or `device: gpu` has no GPU to use and is refused."""
    from kdray.errors import UserError
    from kdray.runtime.resources import plan_run, read_view
    from tests.conftest import cpu_computes_bf16

    view = read_view()
    assert view.gpus == 0 and not view.addable
    plan = plan_run(load_config("smoke"), view)
    assert not plan.students.on_gpu and plan.students.resources.cpus_per_worker == 1.0
    here = "bf16" if cpu_computes_bf16() else "fp32"
    line = plan.students.line("auto")
    assert line.startswith("resources (students): CPU (no GPU in the cluster), 1 CPU per worker; ")
    assert f"; {here} (train.precision auto: this machine's CPU has" in line
    assert plan.students.line("fp32").endswith("; fp32 (train.precision)")
    # A cluster joined by address that says nothing of its autoscaler may still get GPU nodes:
    # `device: gpu` waits for them there (`kdray.runtime.resources.wait_for_gpus`); this one cannot.
    local = dataclasses.replace(view, local=True)
    with pytest.raises(UserError, match="device: gpu, but this machine has no GPU"):
        plan_run(load_config("smoke", ["resources.device=gpu"]), local)
    with pytest.raises(UserError, match="gpus_per_worker: 0.25, but this Ray has no GPU"):
        plan_run(load_config("smoke", ["resources.gpus_per_worker=0.25"]), local)


# ----------------------------------------------------------------------------- two runs at once


def test_two_smoke_searches_on_one_machine_at_once(tmp_path):
    """Each starts its own local Ray cluster beside the test session's: both complete, every
    trial of each reports all its epochs. Both run with torchrun's variables in their
    environment (a command started under torchrun, or from a shell that exported them): the
    trial processes inherit them, and Ray Train's local mode would then wait in
    `init_process_group` for a second rank that never comes (`kdray.runtime.devices.TORCHRUN_ENV`)."""
    from tests.ray_nodes import free_port

    env = {**os.environ, "KDRAY_CACHE": str(tmp_path / "cache"), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.pop("RAY_ADDRESS", None)
    procs = [subprocess.Popen([sys.executable, "-m", "kdray.search", "--space", "smoke", "--no-final", "--wandb",
                               "disabled", "--output-dir", str(tmp_path / f"out{i}"), "--set", "search.trials=2",
                               "--set", "search.concurrency=1", "--set", "space.epochs=[1]",
                               "--set", "teacher.train.epochs=1"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        assert "multiple active Ray instances" not in out, out[-3000:]
        rows = pq.read_table(tmp_path / f"out{i}" / "smoke" / "search" / "trials.parquet").to_pylist()
        assert len(rows) == 2 and all(r["status"] in ("completed", "stopped early") for r in rows), rows
