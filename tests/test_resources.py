"""The resource plan from the cluster's shape (live nodes and what its autoscaler can add), the
memory probe's parts, and the smaller GPU-path guards that a CPU can show. No Ray needed: the
plan is a function of a `ClusterView`, and the probe counts on the CPU the parts CUDA would."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kdray.config import ResourcesConfig, load_config
from kdray.errors import UserError
from kdray.runtime.devices import DeviceError
from kdray.runtime.resources import (ClusterView, NodeKind, check_placements, hold_local_gpus, launcher_node_types,
                                     plan_role, plan_run, spread_students)
from tests.conftest import ROOT, TINY_CONFIGS


CPU_HEAD = NodeKind("head", 8, 0)


def view(*nodes: NodeKind, addable: tuple[NodeKind, ...] = (), autoscaler: str | None = None,
         local: bool = False) -> ClusterView:
    return ClusterView(tuple(nodes), addable, autoscaler, local)


def test_the_shipped_aws_layout_plans_gpus_that_are_not_up_yet():
    """`launch/aws.yaml` on its head: a CPU head, GPU workers from 0. Read as the launcher writes
    it (~/ray_bootstrap_config.yaml), its GPU workers count, so an `auto` space trains on them
    instead of on the head's CPUs."""
    addable, source = launcher_node_types(ROOT / "launch" / "aws.yaml")
    assert [(k.name, k.cpus, k.gpus, k.count) for k in addable] == [("gpu_worker", 4, 1, 4)]
    aws = view(CPU_HEAD, addable=addable, autoscaler=source)
    cfg = load_config("default")
    plan = plan_run(cfg, aws)
    assert plan.teacher.on_gpu and plan.students.on_gpu and plan.teacher.resources.gpus_per_worker == 1.0
    assert "the autoscaler can add gpu_worker x4" in plan.students.note
    # Without the autoscaler's config the same cluster is a CPU head: the old, wrong plan.
    assert not plan_run(cfg, view(CPU_HEAD)).students.on_gpu


def test_device_gpu_where_no_gpu_can_come_is_refused_with_the_fix():
    res = ResourcesConfig(device="gpu")
    with pytest.raises(UserError, match=r"resources.device: gpu, but this machine has no GPU\. Fix: --set"):
        plan_role(res, view(NodeKind("here", 2, 0), local=True), role="students", concurrency=1)
    with pytest.raises(UserError, match="the autoscaler can add none"):
        plan_role(res, view(CPU_HEAD, addable=(NodeKind("cpu_worker", 8, 0, count=2, live=False),),
                            autoscaler="config"), role="students", concurrency=1)
    # A joined cluster that says nothing of the nodes it can add: GPU nodes may still join.
    assert plan_role(res, view(CPU_HEAD), role="students", concurrency=1).on_gpu


def test_ddp_ranks_never_share_a_gpu():
    with pytest.raises(UserError) as e:
        plan_role(ResourcesConfig(workers=2, gpus_per_worker=0.5), view(NodeKind("g", 8, 2)), role="students",
                  concurrency=1)
    assert "resources.gpus_per_worker: 0.5 with resources.workers 2" in str(e.value) and "Fix: --set" in str(e.value)
    plan = plan_role(ResourcesConfig(workers=2), view(NodeKind("g", 8, 2)), role="students", concurrency=1)
    assert plan.resources.gpus_per_worker == 1.0 and "1 whole GPU per rank" in plan.note


def test_a_placement_that_can_never_fit_is_refused_before_anything_runs():
    one_gpu = view(NodeKind("g", 8, 1))
    plan = plan_role(ResourcesConfig(workers=2), one_gpu, role="students", concurrency=1)
    with pytest.raises(UserError) as e:
        check_placements([(plan, "resources")], one_gpu)
    assert "students trials need 2 worker(s) of 1 CPU + 1 GPU at once" in str(e.value)
    assert "holds 1. Fix: --set resources.workers=1" in str(e.value)
    # Two one-GPU nodes hold two ranks; so does one node plus one the autoscaler can add.
    check_placements([(plan, "resources")], view(NodeKind("a", 8, 1), NodeKind("b", 8, 1)))
    check_placements([(plan, "resources")], view(NodeKind("a", 8, 1), addable=(NodeKind("g", 8, 1, count=1, live=False),),
                                                 autoscaler="config"))
    # A CPU bundle larger than any node.
    big = plan_role(ResourcesConfig(cpus_per_worker=16), view(CPU_HEAD), role="teacher", concurrency=1)
    with pytest.raises(UserError, match="teacher.resources: teacher trials need 1 worker"):
        check_placements([(big, "teacher.resources")], view(CPU_HEAD))


def test_students_spread_over_the_gpus_before_any_gpu_holds_two():
    two = view(NodeKind("a", 8, 2), NodeKind("b", 8, 1))  # three GPUs
    plan = plan_role(ResourcesConfig(), two, role="students", concurrency=3)
    spread = spread_students(plan, two, 3, {"A10G": 8})
    assert spread.resources.gpus_per_worker == 1.0 and spread.per_gpu == 1  # three trials, three GPUs
    spread = spread_students(plan, two, 5, {"A10G": 8})
    assert spread.per_gpu == 2 and spread.resources.gpus_per_worker == 0.5  # five trials: two on some GPUs
    # Memory decides when it allows fewer: the smallest GPU type counts.
    spread = spread_students(plan, two, 9, {"A10G": 8, "T4": 2})
    assert spread.per_gpu == 2 and "3 trial(s) wait for room" in spread.note
    # An explicit share is used as given.
    given = plan_role(ResourcesConfig(gpus_per_worker=0.25), two, role="students", concurrency=8)
    assert spread_students(given, two, 8, {"A10G": 8}).resources.gpus_per_worker == 0.25


def test_the_memory_probe_counts_every_part_of_a_trial():
    """On the CPU the probe counts what CUDA would measure: the whole student's weights, the
    resident splits and logits, AdamW's state and gradients, and a step's activations. Each part
    is what its tensors hold."""
    from kdray.evaluate.memory import measure
    from kdray.train.batches import DeviceSplit, Split
    from kdray.train.logits import TeacherLogits
    from kdray.train.loop import DistillData, DistillJob
    from kdray.train.models import build_student

    cfg = load_config("smoke")
    rng = torch.Generator().manual_seed(0)
    n, length = 96, 20
    split = Split([torch.randint(5, 900, (length,), generator=rng).numpy().astype("int32") for _ in range(n)],
                  (torch.arange(n) % 2).numpy(), torch.arange(n).numpy())
    logits = TeacherLogits(split.example_ids, torch.zeros(n, 2).numpy())
    job = DistillJob(cfg.student, cfg.train, ["neg", "pos"], 0)
    mem = measure(job, DistillData(split, split, logits), torch.device("cpu"), "simulated", 2**30)
    model = build_student(cfg.student, 2, ["neg", "pos"])
    every = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert mem.weights == every  # the frozen base too, not only what trains
    resident = DeviceSplit(split, 0, "cpu", logits)
    assert mem.resident_data >= resident.input_ids.numel() * 4 + resident.teacher_logits.numel() * 4
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    assert mem.optimizer == 3 * trainable + 4 * tensors  # AdamW's two moments, its step counts, the gradients
    assert mem.step > 0 and mem.reserve == 0 and mem.measured == "estimate"
    assert mem.per_trial == mem.weights + mem.resident_data + mem.teacher + mem.optimizer + mem.step + mem.reserve
    assert mem.fits(8) == min(8, int(0.9 * 2**30 // mem.per_trial))


def test_the_probe_runs_on_a_model_with_a_small_vocabulary():
    """The probe runs the trial's own rows, not made-up token ids (ids 1000-1999 crashed a
    student whose vocabulary is under 2,000)."""
    from kdray.evaluate.memory import measure
    from kdray.train.batches import Split
    from kdray.train.loop import DistillData, DistillJob

    cfg = load_config("smoke")
    student = dataclasses.replace(cfg.student, config=TINY_CONFIGS["roberta"])  # 1,000 tokens
    ids = [torch.arange(3, 3 + k).numpy().astype("int32") for k in (5, 9, 12)]
    split = Split(ids, torch.tensor([0, 1, 0]).numpy(), torch.arange(3).numpy())
    job = DistillJob(student, dataclasses.replace(cfg.train, alpha=1.0), ["neg", "pos"], 1)
    assert measure(job, DistillData(split, split), torch.device("cpu"), "simulated", 2**30).step > 0


def test_a_second_local_run_cannot_take_the_gpus_the_first_holds(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from kdray.runtime.resources import hold_local_gpus
        lock = hold_local_gpus(Path({str(tmp_path)!r}), 2)
        print("held", flush=True)
        time.sleep(60)
        """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DeviceError) as e:
            hold_local_gpus(tmp_path, 2)
        assert f"another local kdray run (pid {holder.pid})" in str(e.value) and "Fix:" in str(e.value)
        assert hold_local_gpus(tmp_path / "cpu", 0) is None  # CPUs are shared, not held
    finally:
        holder.kill()
        holder.wait()
    assert hold_local_gpus(tmp_path, 2) is not None  # free once the holder has gone


def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it(monkeypatch):
    """T4 and V100 emulate bf16 (slower than fp32), though `torch.cuda.is_bf16_supported()` says
    yes: `auto` reads the compute capability."""
    from kdray.train.precision import resolve_precision

    props = {"T4": 7, "A10G": 8}
    for name, major in props.items():
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, m=major: type("P", (), {"major": m}))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert resolve_precision(torch.device("cuda", 0), "auto") == ("bf16" if major >= 8 else "fp32"), name


def test_torchrun_variables_are_dropped_from_a_trial_process(monkeypatch):
    from kdray.runtime.devices import forget_torchrun_env

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "PATH": os.environ["PATH"]}.items():
        monkeypatch.setenv(k, v)
    assert sorted(forget_torchrun_env()) == ["MASTER_ADDR", "RANK", "WORLD_SIZE"]
    assert "RANK" not in os.environ and "PATH" in os.environ
