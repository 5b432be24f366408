"""The distillation loop: loss golden values, batching, cached vs online teacher, checkpoints,
and a real 2-worker (gloo) Ray Train run that resumes from its epoch-1 checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdray import metrics as M
from kdray.config import load_config
from kdray.data.load import load_data
from kdray.data.tokenize import tokenize
from kdray.train.batches import DeviceSplit, Split, make_batches
from kdray.train.logits import TeacherLogits
from kdray.train.loop import DistillData, DistillJob, OnlineTeacher, cached_teacher, distill, predict_logits
from kdray.train.loss import kd_loss
from kdray.train.models import build_model, build_student, load_tokenizer
from kdray.train.precision import resolve_precision
from tests.conftest import cpu_computes_bf16


# ----------------------------------------------------------------------------- loss golden values


S = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
T = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 4.0]])
Y = torch.tensor([0, 2])


def softmax(x, t=1.0):
    e = np.exp(np.asarray(x, dtype=np.float64) / t)
    return e / e.sum(-1, keepdims=True)


def test_alpha_one_is_cross_entropy_and_needs_no_teacher():
    loss, ce, kd = kd_loss(S, Y, None, alpha=1.0, temperature=4.0)
    assert loss.item() == pytest.approx(F.cross_entropy(S, Y).item(), abs=1e-7)
    assert kd.item() == 0.0


def test_alpha_zero_t_one_is_kl_teacher_to_student():
    loss, _, _ = kd_loss(S, Y, T, alpha=0.0, temperature=1.0)
    p, q = softmax(T), softmax(S)
    kl = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))  # KL(teacher || student), batch mean
    assert loss.item() == pytest.approx(kl, abs=1e-6)
    # Golden, by hand: row 1 has p = reversed q, so KL = (p0 - p2) * 2 = 1.15040; row 2 gives
    # 0.14351; their mean is 0.64696.
    assert loss.item() == pytest.approx(0.64696, abs=1e-5)


@pytest.mark.parametrize("temperature", [2.0, 5.0])
def test_temperature_squared_factor_and_mix(temperature):
    loss, ce, kd = kd_loss(S, Y, T, alpha=0.3, temperature=temperature)
    p, q = softmax(T, temperature), softmax(S, temperature)
    kl = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))
    assert kd.item() == pytest.approx(temperature**2 * kl, rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * F.cross_entropy(S, Y).item() + 0.7 * temperature**2 * kl, rel=1e-5)


def test_unlabeled_rows_count_in_kd_only():
    """Transfer rows (label -1): CE averages over the labelled rows, KD over every row."""
    S3 = torch.cat([S, torch.tensor([[2.0, 0.0, -1.0]])])
    T3 = torch.cat([T, torch.tensor([[0.0, 1.0, 0.0]])])
    loss, ce, kd = kd_loss(S3, torch.tensor([0, 2, -1]), T3, alpha=0.3, temperature=2.0)
    p, q = softmax(T3, 2.0), softmax(S3, 2.0)
    kl = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))  # all three rows
    assert ce.item() == pytest.approx(F.cross_entropy(S, Y).item(), rel=1e-6)  # the two labelled rows
    assert kd.item() == pytest.approx(4.0 * kl, rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * ce.item() + 0.7 * 4.0 * kl, rel=1e-5)
    # A batch of transfer rows only: no hard-label term at all (not 0/0).
    loss, ce, kd = kd_loss(S, torch.tensor([-1, -1]), T, alpha=0.3, temperature=1.0)
    assert ce.item() == 0.0 and loss.item() == pytest.approx(0.7 * 0.64696, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0, 10.0, 20.0])
def test_gradients_finite_across_temperatures(temperature):
    s = (torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * 30).requires_grad_()
    t = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)) * 30
    loss, _, _ = kd_loss(s, torch.arange(8) % 4, t, alpha=0.5, temperature=temperature)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- batching


def test_batches_shard_evenly_cover_everything_and_reshuffle():
    lengths = np.random.default_rng(0).integers(3, 60, size=103)
    world = 2
    per_rank = [make_batches(lengths, 8, shuffle=True, seed=0, epoch=0, group_by_length=True, rank=r, world_size=world)
                for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1]) == 7  # ceil(13 batches / 2): wrap-around pads rank 1
    seen = np.concatenate([b for r in per_rank for b in r])
    assert set(seen.tolist()) == set(range(103))
    again = make_batches(lengths, 8, shuffle=True, seed=0, epoch=0, group_by_length=True)
    other = make_batches(lengths, 8, shuffle=True, seed=0, epoch=1, group_by_length=True)
    assert [b.tolist() for b in again] == [b.tolist() for b in make_batches(lengths, 8, shuffle=True, seed=0, epoch=0, group_by_length=True)]
    assert [b.tolist() for b in again] != [b.tolist() for b in other]


def padding_efficiency(lengths, batches):
    return sum(lengths[b].sum() for b in batches) / sum(len(b) * lengths[b].max() for b in batches)


def test_length_grouping_pads_less():
    lengths = np.random.default_rng(0).integers(3, 120, size=2000)
    grouped = make_batches(lengths, 32, shuffle=True, seed=0, epoch=0, group_by_length=True)
    plain = make_batches(lengths, 32, shuffle=True, seed=0, epoch=0, group_by_length=False)
    assert padding_efficiency(lengths, grouped) > 0.9 > 0.7 > padding_efficiency(lengths, plain)


# ----------------------------------------------------------------------------- loop (no Ray)


@pytest.fixture(scope="module")
def smoke():
    cfg = load_config("smoke", ["data.max_train_samples=256", "data.max_validation_samples=64"])
    task = load_data(cfg.data)
    tok = load_tokenizer(cfg.student)
    tk, _ = tokenize(task, tok, cfg.data.max_length)
    return cfg, task, tok, Split.from_dataset(tk["train"]), Split.from_dataset(tk["validation"])


def test_cached_and_online_teacher_give_the_same_loss(smoke):
    cfg, task, tok, train, val = smoke
    teacher = build_model(cfg.teacher, 2, seed=3).eval()
    # Cached: computed once, in length-sorted batches of another composition and padding. In
    # fp32: under bf16 a row's logits move by bf16's rounding with its batch's padding width.
    table = TeacherLogits(train.example_ids,
                          predict_logits(teacher, train, 100, tok.pad_token_id, torch.device("cpu"), precision="fp32"))
    idx = make_batches(train.lengths, 32, shuffle=True, seed=0, epoch=0, group_by_length=False)[0]
    batch = DeviceSplit(train, tok.pad_token_id, "cpu", table).batch(idx)
    student_logits = torch.randn(len(idx), 2, generator=torch.Generator().manual_seed(0))
    cached = kd_loss(student_logits, batch["labels"], cached_teacher(batch), 0.4, 3.0)[0]
    online = kd_loss(student_logits, batch["labels"], OnlineTeacher(teacher)(batch), 0.4, 3.0)[0]
    assert abs(cached.item() - online.item()) < 1e-5
    assert cached.item() > 0


def test_missing_logits_are_a_clear_error(smoke):
    cfg, task, tok, train, val = smoke
    table = TeacherLogits(train.example_ids[:10], np.zeros((10, 2), np.float32))
    with pytest.raises(KeyError, match="no teacher logits for example_id"):
        table.lookup(train.example_ids[10:12])


def test_kd_runs_pass_over_the_transfer_set_and_no_kd_runs_never_see_it(smoke):
    cfg, task, tok, train, val = smoke
    transfer = Split(val.input_ids, np.full(len(val), -1), val.example_ids + 10**9, val.token_type_ids)  # unlabeled
    teacher = build_model(cfg.teacher, 2, seed=3).eval()
    both = train.concat(transfer)
    table = TeacherLogits(both.example_ids, predict_logits(teacher, both, 100, tok.pad_token_id, torch.device("cpu")))
    data = DistillData(train, val, table, transfer=transfer)
    seen = {}
    for alpha in (0.5, 1.0):
        job = DistillJob(cfg.student, dataclasses.replace(cfg.train, epochs=1, alpha=alpha), task.label_names,
                         tok.pad_token_id)
        rows = []
        distill(job, data, lambda m, c: rows.append(m), log=False)
        seen[alpha] = round(rows[0][M.SAMPLES_PER_S] * rows[0][M.EPOCH_SECONDS])  # examples the epoch trained on
    assert seen == {0.5: len(train) + len(transfer), 1.0: len(train)}


def test_bf16_precision_autocasts_the_forwards_and_keeps_the_weights_fp32(smoke):
    cfg, task, tok, train, val = smoke
    cpu = torch.device("cpu")
    assert [resolve_precision(cpu, p) for p in ("bf16", "fp32")] == ["bf16", "fp32"]
    assert resolve_precision(cpu, "auto") == ("bf16" if cpu_computes_bf16() else "fp32")  # as /proc/cpuinfo says
    teacher = build_model(cfg.teacher, 2, seed=3).eval()
    table = TeacherLogits(train.example_ids, predict_logits(teacher, train, 100, tok.pad_token_id, cpu))
    history, dtypes = {}, {}
    for precision in ("bf16", "fp32"):
        job = DistillJob(cfg.student, dataclasses.replace(cfg.train, epochs=1, alpha=0.5, precision=precision),
                         task.label_names, tok.pad_token_id)
        model = build_student(job.model, job.num_labels, job.label_names, seed=0)
        seen = dtypes[precision] = set()
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        first.register_forward_hook(lambda m, i, out, seen=seen: seen.add(out.dtype))
        history[precision] = distill(job, DistillData(train, val, table), lambda m, c: None, log=False,
                                     model=model).history[0]
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # autocast, not a cast of the weights
    assert dtypes == {"bf16": {torch.bfloat16}, "fp32": {torch.float32}}  # training and validation forwards
    # The same run up to bf16 rounding: same data order, same seeds.
    assert math.isfinite(history["bf16"][M.TRAIN_LOSS])
    assert history["bf16"][M.TRAIN_LOSS] == pytest.approx(history["fp32"][M.TRAIN_LOSS], rel=0.05)
    assert history["bf16"][M.TRAIN_LOSS] != history["fp32"][M.TRAIN_LOSS]


def test_non_finite_loss_stops_with_status_diverged(smoke):
    cfg, task, tok, train, val = smoke
    bad = TeacherLogits(train.example_ids, np.full((len(train), 2), np.nan, np.float32))
    job = DistillJob(cfg.student, dataclasses.replace(cfg.train, epochs=2), task.label_names, tok.pad_token_id)
    reports = []
    result = distill(job, DistillData(train, val, bad), lambda m, c: reports.append((m, c)), log=False)
    assert result.status == M.STATUS_DIVERGED
    assert [m[M.STATUS] for m, _ in reports] == [M.STATUS_DIVERGED] and reports[0][1] is None


def test_checkpoint_resume_in_process_continues_at_epoch_two(smoke, tmp_path):
    cfg, task, tok, train, val = smoke
    job = DistillJob(cfg.teacher, dataclasses.replace(cfg.teacher.train, epochs=2), task.label_names, tok.pad_token_id)
    saved = {}

    def keep(metrics, ckpt):
        dest = tmp_path / f"e{metrics['epoch']}"
        import shutil

        shutil.copytree(ckpt, dest)
        saved[metrics["epoch"]] = metrics

    full = distill(job, DistillData(train, val), keep, log=False)
    resumed_reports = []
    resumed = distill(job, DistillData(train, val), lambda m, c: resumed_reports.append(m), resume_from=tmp_path / "e1", log=False)
    assert [m["epoch"] for m in resumed_reports] == [2]
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    # Same data order, same dropout seeds, same optimizer state: the same epoch 2.
    assert resumed.history[1][M.VAL_LOSS] == pytest.approx(full.history[1][M.VAL_LOSS], rel=1e-4)


# ----------------------------------------------------------------------------- on Ray Train


def test_two_worker_ray_train_run_reports_each_epoch_and_resumes(ray_cluster, smoke, tmp_path):
    from ray.train import Checkpoint

    from kdray.runtime.engine import TrialSpec, ddp_loop, distill_entry, fit

    cfg, task, tok, train, val = smoke
    table = TeacherLogits(train.example_ids, np.random.default_rng(0).normal(size=(len(train), 2)).astype(np.float32))
    job = DistillJob(cfg.student, dataclasses.replace(cfg.train, epochs=2), task.label_names, tok.pad_token_id)
    resources = dataclasses.replace(cfg.resources, workers=2)
    data_ref = ray_cluster.put(DistillData(train, val, table))
    spec = TrialSpec(distill_entry, job, data_ref, resources, str(tmp_path))
    result = fit(ddp_loop, {"spec": spec, "job": job}, name="two-workers", storage_path=tmp_path, resources=resources)
    run_dir = Path(result.path)
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    states = [json.loads((c / "state.json").read_text()) for c in checkpoints]
    assert [s["epochs_done"] for s in states] == [1, 2]
    history = states[-1]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h[M.TRAINABLE_PARAMS] == 2146 for h in history)  # the real model's count, from the worker
    assert all(math.isfinite(h[M.VAL_LOSS]) and 0 <= h[M.VAL_ACCURACY] <= 1 for h in history)
    assert history[0][M.TRAIN_KD] > 0  # the KD term was on

    resumed = fit(ddp_loop, {"spec": spec, "job": job, "resume_from": Checkpoint.from_directory(str(checkpoints[0]))},
                  name="two-workers-resumed", storage_path=tmp_path, resources=resources)
    resumed_ckpts = sorted(p for p in Path(resumed.path).glob("checkpoint_*") if p.is_dir())
    assert len(resumed_ckpts) == 1  # only epoch 2 ran
    state = json.loads((resumed_ckpts[0] / "state.json").read_text())
    assert state["epochs_done"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    assert state["history"][0] == history[0]


def test_distill_cli_trains_each_seed_and_summarises_them(ray_cluster, tmp_path, capsys):
    """`kdray distill --seeds 2`: two runs of one configuration with the final stage's seeds
    (seed, seed + 1) against one teacher, each seed's table, and the mean and std of their last
    validation accuracies. The seeds must reach the trial: the two runs train differently."""
    import re
    import statistics

    from kdray.cli.main import main

    assert main(["distill", "--space", "smoke", "--seeds", "2", "--set", "seed=3", "--set", "train.epochs=1",
                         "--set", "train.learning_rate=0.05", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seed 3:" in out and "seed 4:" in out, out[-3000:]
    # epoch 1's train loss, ce, kd, val loss and val acc
    rows = re.findall(r"^\s+1\s+([\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+)\s+([\d.]+)", out, flags=re.M)
    assert len(rows) == 2, out[-3000:]
    (losses3, acc3), (losses4, acc4) = rows
    assert losses3 != losses4, "both seeds trained alike: the seed did not reach the trial"
    summary = re.search(r"over 2 seeds \(3-4\): mean ([\d.]+), std ([\d.]+)", out)
    assert summary, out[-3000:]
    accs = [float(acc3), float(acc4)]
    assert float(summary[1]) == pytest.approx(statistics.mean(accs), abs=1e-4)
    assert float(summary[2]) == pytest.approx(statistics.stdev(accs), abs=1e-4)
