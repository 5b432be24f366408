"""Distillation loop: what every trial runs, and what a test or notebook can run alone.

`distill()` takes a `report(metrics, checkpoint_dir)` callable, so the same loop runs in a Tune
trial or on Ray Train workers (`kdray.runtime.engine`), under a plain test, or in a notebook. Each
worker trains on its shard of length-grouped batches (distributed-sampler semantics: every rank the same number of steps,
reshuffled per epoch), reads the teacher's logits by `example_id` (or runs the teacher forward
per batch in `online` mode), evaluates every epoch with metrics all-reduced across workers, and
reports one checkpoint of the trainable weights per epoch. `kdray distill` runs one.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdray import metrics as M
from kdray.config import TrainableModelConfig, TrainConfig
from kdray.train.batches import DeviceSplit, Split, make_batches, model_inputs
from kdray.train.checkpoint import load_checkpoint, save_checkpoint, unwrap
from kdray.train.logits import TeacherLogits
from kdray.train.loss import kd_loss
from kdray.train.precision import autocast_for, resolve_precision


Report = Callable[[dict[str, Any], "str | None"], None]
#: Steps between the host's looks at the running loss (logging, divergence): no per-step sync.
CHECK_EVERY = 25


def say(message: str) -> None:
    """Print one progress line. Not `print`: Ray Train patches it on workers and the line would
    reach the driver twice (once through logging, once through the wrapped stdout)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def cached_teacher(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cached mode: the teacher's logits, looked up once per trial into the `DeviceSplit` and cut
    with the batch. No teacher forward at all."""
    return batch["teacher_logits"]


class OnlineTeacher:
    """The usual way: run the frozen teacher forward on every batch."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**model_inputs(batch)).logits.float()


@dataclass
class DistillJob:
    """What one distillation trains: the model choice and how it trains."""

    model: TrainableModelConfig
    train: TrainConfig
    label_names: list[str]
    pad_token_id: int
    seed: int = 0

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class DistillData:
    """The read-only inputs, put in the object store once and shared by every trial."""

    train: Split
    validation: Split
    teacher_logits: TeacherLogits | None = None
    """Cached mode: the teacher's logits on train (and validation, and the transfer set)."""
    transfer: Split | None = None
    """The transfer set (labels `UNLABELED`): KD runs (alpha < 1) train on train + transfer,
    the hard-label term on train only; the no-KD baseline never sees it."""
    teacher_model: Any = None
    """Online mode: a `kdray.train.models.to_payload` of the fine-tuned teacher."""
    student_base: Any = None
    """`student.init: teacher`: the weights the student starts from (a `to_payload` of the
    fine-tuned teacher, the object online mode also uses); None: the pretrained checkpoint."""


@dataclass
class DistillResult:
    model: nn.Module
    """The trained model, unwrapped from DDP (its state at the last epoch)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = M.STATUS_COMPLETED


def _all_reduce(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


@torch.no_grad()
def predict_logits(model: nn.Module, split: Split | DeviceSplit, batch_size: int, pad_id: int, device: torch.device,
                   indices: np.ndarray | None = None, progress: Callable[[int, int], None] | None = None,
                   precision: str = "auto") -> np.ndarray:
    """Logits [len(indices), K] for `indices` of `split` (all by default), in that order, computed
    in `precision` (`TrainConfig.precision`).

    Sorted by length inside so batches pad little; results are put back in the given order and
    copied to the host once.
    """
    model.eval()
    resident = split if isinstance(split, DeviceSplit) else DeviceSplit(split, pad_id, device)
    idx = np.arange(len(resident)) if indices is None else np.asarray(indices, dtype=np.int64)
    if not len(idx):
        return np.zeros((0, 0), np.float32)
    perm = np.argsort(-resident.lengths[idx], kind="stable")
    order = idx[perm]
    parts = []
    context = autocast_for(device, precision)
    for start in range(0, len(order), batch_size):
        with context:
            parts.append(model(**model_inputs(resident.batch(order[start:start + batch_size]))).logits.float())
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    logits = np.empty((len(order), parts[0].shape[-1]), dtype=np.float32)
    logits[perm] = torch.cat(parts).cpu().numpy()
    return logits


def evaluate(model: nn.Module, split: Split | DeviceSplit, job: DistillJob, device: torch.device, rank: int = 0,
             world_size: int = 1, prefix: str = "val") -> dict[str, float]:
    """Loss, accuracy and macro-F1 over the whole split: each rank scores its share (rows
    `rank::world_size`), then `score_logits` all-reduces them."""
    mine = np.arange(rank, len(split), world_size)
    logits = predict_logits(unwrap(model), split, job.train.eval_batch_size, job.pad_token_id, device, mine,
                            precision=job.train.precision)
    labels = (split.host_labels if isinstance(split, DeviceSplit) else split.labels)[mine]
    return score_logits(logits, labels, job.num_labels, device, world_size, prefix)


def score_logits(logits: np.ndarray, labels: np.ndarray, k: int, device: torch.device, world_size: int = 1,
                 prefix: str = "val") -> dict[str, float]:
    """Loss, accuracy and macro-F1 of this rank's logits [N, K] against labels [N], the
    confusion matrix and loss sum all-reduced across ranks (exact, unlike averaging per-rank
    metrics). Every rank calls it."""
    confusion = torch.zeros(k * k + 2, dtype=torch.float64)
    if len(labels):
        lt = torch.from_numpy(logits)
        confusion[-2] = F.cross_entropy(lt, torch.from_numpy(labels), reduction="sum").item()
        np.add.at(confusion[: k * k].numpy(), labels * k + lt.argmax(-1).numpy(), 1)
    confusion[-1] = len(labels)
    if world_size > 1:
        confusion = _all_reduce(confusion.to(device), world_size).cpu()
    cm = confusion[: k * k].numpy().reshape(k, k).astype(np.int64)
    out = {f"{prefix}/loss": float(confusion[-2] / max(confusion[-1], 1))}
    out.update(M.classification_metrics(cm, prefix))
    return out


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=device.type == "cuda")


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], teacher: Callable | None, cfg: TrainConfig,
                 autocast: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's KD loss: teacher logits (cached look-up or online forward, in the training
    precision as the cached ones were computed), student forward."""
    with autocast:
        t_logits = teacher(batch) if teacher is not None else None
        logits = model(**model_inputs(batch)).logits
    return kd_loss(logits, batch["labels"], t_logits, cfg.alpha, cfg.temperature)


def backward_step(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any,
                  cfg: TrainConfig) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()


def distill(job: DistillJob, data: DistillData, report: Report, *, rank: int = 0, world_size: int = 1,
            device: str | torch.device = "cpu", resume_from: str | os.PathLike | None = None,
            prepare_model: Callable[[nn.Module], nn.Module] | None = None, log: bool = True,
            model: nn.Module | None = None) -> DistillResult:
    """Train `job` on `data`, evaluating and reporting (metrics, checkpoint dir) every epoch.

    `prepare_model` wraps the model for the cluster (Ray's `prepare_model`: device + DDP);
    `resume_from` is a checkpoint dir written by `save_checkpoint`: training continues at the
    epoch after it. A non-finite loss on any rank stops every rank with status `diverged`.
    """
    from transformers import get_linear_schedule_with_warmup

    from kdray.train.models import build_student, count_trainable, from_payload

    device = torch.device(device)
    cfg = job.train
    torch.manual_seed(job.seed)
    if model is None:
        model = build_student(job.model, job.num_labels, job.label_names, device="cpu", seed=job.seed,
                              base=data.student_base)
    trainable = count_trainable(model)
    model = prepare_model(model) if prepare_model is not None else model.to(device)
    teacher: Callable | None = None
    cached = cfg.alpha < 1.0 and cfg.teacher_logits != "online"
    if cfg.alpha < 1.0:
        teacher = cached_teacher if cached else OnlineTeacher(from_payload(data.teacher_model).to(device))
    rows = data.train if teacher is None or data.transfer is None else data.train.concat(data.transfer)
    # The splits go to the device once per trial; a step only indexes them.
    train = DeviceSplit(rows, job.pad_token_id, device, data.teacher_logits if cached else None)
    validation = DeviceSplit(data.validation, job.pad_token_id, device)
    # make_batches' count: ceil(examples / batch) batches, dealt evenly (wrapping) to the ranks.
    steps_per_epoch = math.ceil(math.ceil(len(rows) / cfg.batch_size) / world_size)
    optimizer = make_optimizer(model, cfg, device)
    total = max(1, steps_per_epoch * cfg.epochs)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    start_epoch, history = 0, []
    if resume_from is not None:
        start_epoch, history = load_checkpoint(Path(resume_from), model, optimizer, scheduler)
        if log and rank == 0:
            say(f"resumed from {resume_from} after epoch {start_epoch}")
    autocast = autocast_for(device, cfg.precision)
    if log and rank == 0:
        say(f"training in {resolve_precision(device, cfg.precision)} on {device.type} (precision: {cfg.precision})")
    status = M.STATUS_COMPLETED
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(job.seed * 1_000_003 + epoch * 101 + rank)  # dropout: reproducible on resume
        model.train()
        batches = make_batches(train.lengths, cfg.batch_size, shuffle=True, seed=job.seed, epoch=epoch,
                               group_by_length=cfg.group_by_length, rank=rank, world_size=world_size)
        # Sums of loss, ce, kd (each x batch size) and examples stay on the device: the host
        # looks at them every CHECK_EVERY steps, not every step. A non-finite loss makes them
        # non-finite, so that look also catches divergence (on every rank at the same step).
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        t0 = last_log = time.perf_counter()
        for step, idx in enumerate(batches, 1):
            loss, ce, kd = forward_loss(model, train.batch(idx), teacher, cfg, autocast)
            backward_step(model, loss, optimizer, scheduler, cfg)
            sums += torch.stack([loss.detach(), ce, kd, torch.ones_like(ce)]).double() * len(idx)
            if step % CHECK_EVERY and step != len(batches):
                continue
            seen = _all_reduce(sums.clone(), world_size).cpu()
            if not torch.isfinite(seen).all():
                status = M.STATUS_DIVERGED
                break
            now = time.perf_counter()
            if log and rank == 0 and (now - last_log > 10 or step == len(batches)):
                last_log = now
                rate = step / (now - t0)
                say(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{len(batches)} loss {seen[0] / seen[3]:.4f} "
                    f"| {rate * cfg.batch_size * world_size:.1f} samples/s | epoch eta {(len(batches) - step) / rate:.0f}s")
        seconds = time.perf_counter() - t0
        sums = _all_reduce(sums, world_size).cpu()
        row: dict[str, Any] = {
            "epoch": epoch + 1, M.EPOCHS_DONE: epoch + 1, M.TRAINABLE_PARAMS: trainable,
            M.TRAIN_LOSS: float(sums[0] / max(sums[3], 1)), M.TRAIN_CE: float(sums[1] / max(sums[3], 1)),
            M.TRAIN_KD: float(sums[2] / max(sums[3], 1)),
            M.SAMPLES_PER_S: float(sums[3] / seconds) if seconds > 0 else 0.0, M.EPOCH_SECONDS: seconds,
        }
        if status == M.STATUS_DIVERGED:
            row.update({M.STATUS: status, M.VAL_ACCURACY: 0.0, M.VAL_F1: 0.0, M.VAL_LOSS: float("nan")})
            history.append(row)
            if log and rank == 0:
                say(f"epoch {epoch + 1}: non-finite loss, stopping (status {status})")
            report(row, None)
            break
        t_eval = time.perf_counter()
        row.update(evaluate(model, validation, job, device, rank, world_size))
        row[M.EVAL_SECONDS] = time.perf_counter() - t_eval
        row[M.STATUS] = M.STATUS_RUNNING if epoch + 1 < cfg.epochs else M.STATUS_COMPLETED
        history.append(row)
        if log and rank == 0:
            say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row[M.TRAIN_LOSS]:.4f}, val loss "
                f"{row[M.VAL_LOSS]:.4f}, val acc {row[M.VAL_ACCURACY]:.4f}, val f1 {row[M.VAL_F1]:.4f} "
                f"({seconds:.1f}s)")
        with tempfile.TemporaryDirectory(prefix="kdray-ckpt-") as tmp:
            if rank == 0:
                save_checkpoint(Path(tmp), model, optimizer, scheduler, epoch + 1, history)
            report(row, tmp if rank == 0 else None)
    return DistillResult(unwrap(model), history, status)
