"""Distillation loop: what every trial runs, and what a test or notebook can run alone.

`distill()` takes a `report(metrics, checkpoint_dir)` callable, so the same loop runs in a Tune
trial or on Ray Train workers (`kdray.engine`), under a plain test, or in a notebook. Each
worker trains on its shard of length-grouped batches (distributed-sampler semantics: every rank the same number of steps,
reshuffled per epoch), reads the teacher's logits by `example_id` (or runs the teacher forward
per batch in `online` mode), evaluates every epoch with metrics all-reduced across workers, and
reports one checkpoint of the trainable weights per epoch. `python -m kdray.distill` runs one.
"""

from __future__ import annotations

import json
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
from kdray.data import UNLABELED

Report = Callable[[dict[str, Any], "str | None"], None]
#: Steps between the host's looks at the running loss (logging, divergence): no per-step sync.
CHECK_EVERY = 25


def say(message: str) -> None:
    """Print one progress line. Not `print`: Ray Train patches it on workers and the line would
    reach the driver twice (once through logging, once through the wrapped stdout)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- the loss


def kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
            alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`alpha * CE(s, y) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))` (Hinton 2015).

    student_logits, teacher_logits: [B, K]; labels: [B]. Returns `(loss, ce, kd)`; the T^2
    factor keeps the soft term's gradients on the scale of the hard term's as T grows.
    `alpha == 1` needs no teacher (the no-KD baseline and the teacher's own fine-tune).
    Rows labelled `UNLABELED` (-1, the transfer set) are left out of CE, which averages over the
    labelled rows (0 when there are none), and kept in KD, which averages over all rows.
    """
    s = student_logits.float()
    # Sum over labelled rows / their count, not `mean`: a batch of transfer rows only would
    # make `mean` 0/0. The count stays on the device (no host sync).
    ce = F.cross_entropy(s, labels, ignore_index=UNLABELED, reduction="sum") / (labels != UNLABELED).sum().clamp(min=1)
    if alpha == 1.0:
        return ce, ce.detach(), torch.zeros((), device=s.device)
    if teacher_logits is None:
        raise ValueError("alpha < 1 needs teacher logits")
    t = teacher_logits.float()
    kd = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                  reduction="batchmean", log_target=True) * temperature**2
    return alpha * ce + (1.0 - alpha) * kd, ce.detach(), kd.detach()


# ----------------------------------------------------------------------------- data on workers


@dataclass
class Split:
    """One tokenized split as plain arrays: small to pickle, cheap to put in the object store."""

    input_ids: list[np.ndarray]
    labels: np.ndarray
    example_ids: np.ndarray
    token_type_ids: list[np.ndarray] | None = None

    @classmethod
    def from_dataset(cls, ds: Any) -> "Split":
        cols = ds.column_names
        table = ds.with_format("numpy")
        ids = [np.asarray(x, dtype=np.int32) for x in ds["input_ids"]]
        tt = [np.asarray(x, dtype=np.int8) for x in ds["token_type_ids"]] if "token_type_ids" in cols else None
        return cls(ids, np.asarray(table["label"], dtype=np.int64), np.asarray(table["example_id"], dtype=np.int64), tt)

    def __len__(self) -> int:
        return len(self.input_ids)

    def concat(self, other: "Split") -> "Split":
        """This split's rows followed by `other`'s (the teacher's train + held-back rows)."""
        tt = None if self.token_type_ids is None else self.token_type_ids + other.token_type_ids
        return Split(self.input_ids + other.input_ids, np.concatenate([self.labels, other.labels]),
                     np.concatenate([self.example_ids, other.example_ids]), tt)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))


@dataclass
class TeacherLogits:
    """The teacher's logits keyed by example_id (sorted, for binary-search look-up)."""

    example_ids: np.ndarray
    logits: np.ndarray
    """[N, K] float32."""

    def __post_init__(self) -> None:
        order = np.argsort(self.example_ids, kind="stable")
        self.example_ids = np.asarray(self.example_ids)[order]
        self.logits = np.asarray(self.logits, dtype=np.float32)[order]

    def lookup(self, example_ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.example_ids, example_ids)
        pos = np.minimum(pos, len(self.example_ids) - 1)
        missing = self.example_ids[pos] != example_ids
        if missing.any():
            raise KeyError(f"no teacher logits for example_id(s) {example_ids[missing][:5].tolist()}: "
                           f"the logits were computed on other data")
        return self.logits[pos]

    @classmethod
    def from_parquet(cls, *paths: str | os.PathLike | None, split: str | None = None) -> "TeacherLogits":
        """The logits in `write_logits` files (None entries skipped), of one split or all."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pa.concat_tables([pq.read_table(p) for p in paths if p is not None])
        if split is not None:
            table = table.filter(pc.equal(table["split"], split))
        logits = np.stack(table["logits"].to_numpy(zero_copy_only=False)).astype(np.float32)
        return cls(table["example_id"].to_numpy(), logits)


def write_logits(path: str | os.PathLike, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write `{split: (example_ids, logits [N, K])}` as Parquet: example_id, split, logits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, splits, rows = [], [], []
    for split, (eids, logits) in parts.items():
        ids.append(np.asarray(eids, dtype=np.int64))
        splits += [split] * len(eids)
        rows += [row.astype(np.float32) for row in logits]
    table = pa.table({"example_id": np.concatenate(ids), "split": splits,
                      "logits": pa.array(rows, type=pa.list_(pa.float32()))})
    pq.write_table(table, path)


def make_batches(lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                 group_by_length: bool, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """This rank's batches of indices for one epoch.

    Length grouping sorts shuffled mega-batches (50 batches) by length, cuts them into batches
    and shuffles the batch order, so batches pad little but stay random. Batches are dealt
    round-robin to ranks and padded by wrapping around (like `DistributedSampler`), so every rank
    takes the same number of steps and DDP never waits on a missing one.
    """
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    if group_by_length:
        mega = batch_size * 50
        chunks = [order[i:i + mega] for i in range(0, n, mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if shuffle and group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = math.ceil(len(batches) / world_size)
    batches += batches[: per_rank * world_size - len(batches)]
    return batches[rank::world_size]


class DeviceSplit:
    """A split held on the device for a whole trial, so a step needs no host work beyond its
    list of indices: every example padded once to the split's longest ([N, L] int32), lengths,
    labels and, in cached mode, the teacher's logits looked up by example_id once ([N, K]).
    A batch is cut by indexing and trimmed to its own longest example (dynamic padding); that
    length comes from the host copy of the lengths, so cutting never waits on the device.
    65k sentences x 64 tokens is ~16 MB."""

    def __init__(self, split: Split, pad_id: int, device: torch.device | str, teacher: TeacherLogits | None = None):
        self.device = torch.device(device)
        self.lengths = split.lengths
        n, longest = len(split), int(self.lengths.max()) if len(split) else 1
        ids = np.full((n, longest), pad_id, dtype=np.int32)
        tt = np.zeros((n, longest), dtype=np.int8) if split.token_type_ids is not None else None
        for row, x in enumerate(split.input_ids):
            ids[row, :len(x)] = x
            if tt is not None:
                tt[row, :len(x)] = split.token_type_ids[row]
        self.input_ids = torch.from_numpy(ids).to(self.device)
        self.token_type_ids = torch.from_numpy(tt).to(self.device) if tt is not None else None
        # torch.tensor copies: the object store hands out read-only arrays.
        self.lengths_t = torch.tensor(self.lengths, device=self.device)
        self.host_labels = split.labels
        self.labels = torch.tensor(split.labels, device=self.device)
        self.teacher_logits = (torch.tensor(teacher.lookup(split.example_ids), device=self.device)
                               if teacher is not None else None)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows `idx` (host indices), padded to their longest. Shapes [B, L_max]; `labels` [B];
        `teacher_logits` [B, K] in cached mode."""
        width = int(self.lengths[idx].max())
        i = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.device, non_blocking=True)
        positions = torch.arange(width, device=self.device)
        batch = {"input_ids": self.input_ids[i, :width].long(),
                 "attention_mask": (positions < self.lengths_t[i, None]).long(), "labels": self.labels[i]}
        if self.token_type_ids is not None:
            batch["token_type_ids"] = self.token_type_ids[i, :width].long()
        if self.teacher_logits is not None:
            batch["teacher_logits"] = self.teacher_logits[i]
        return batch


# ----------------------------------------------------------------------------- teachers


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


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


# ----------------------------------------------------------------------------- the job


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
    """Online mode: a `kdray.models.to_payload` of the fine-tuned teacher."""
    student_base: Any = None
    """`student.init: teacher`: the weights the student starts from (a `to_payload` of the
    fine-tuned teacher, the object online mode also uses); None: the pretrained checkpoint."""


@dataclass
class DistillResult:
    model: nn.Module
    """The trained model, unwrapped from DDP (its state at the last epoch)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = M.STATUS_COMPLETED


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU that supports it (Ampere on), a CPU
    with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        # Compute capability 8 (Ampere) and later. `torch.cuda.is_bf16_supported()` also says
        # yes for T4 and V100, where bf16 is emulated and slower than fp32.
        return torch.cuda.get_device_properties(device).major >= 8
    if device.type != "cpu":
        return False
    try:  # a private but stable probe (torch >= 2.3); without it, assume no
        caps = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(device: torch.device, precision: str) -> str:
    """`bf16` or `fp32` for a `TrainConfig.precision` on `device`.

    `auto` takes bf16 where it is native: on a 2-core Zen 4 CPU (AVX512-BF16) the default ran
    end to end in 10 min 31 s against 13 min 50 s in fp32, with the same choice and accuracy
    (README, "Performance").
    """
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def describe_precision(precision: str, device_type: str) -> str:
    """What `precision` trains in on `device_type` (`cpu` or `cuda`), for the resources line a run
    prints. `auto` on CPUs is read on this machine: the workers of a CPU cluster decide for
    themselves and say so in their trial logs."""
    if precision != "auto":
        return f"{precision} (train.precision)"
    if device_type == "cuda":
        return "bf16 on GPUs that have it, else fp32 (train.precision auto)"
    here = resolve_precision(torch.device("cpu"), "auto")
    why = "has AVX512-BF16 or AMX" if here == "bf16" else "has neither AVX512-BF16 nor AMX"
    return f"{here} (train.precision auto: this machine's CPU {why})"


def serving_precision(device: torch.device) -> str:
    """The precision test scores and benchmarks run in, whatever the training ran in: what a user
    serving the saved fp32 model gets by default. bf16 autocast on a GPU that computes it
    natively; fp32 on a CPU, so the teacher and every student are scored alike."""
    return "auto" if device.type == "cuda" else "fp32"


def autocast_for(device: torch.device, precision: str = "auto"):
    """The autocast context of `precision` on `device` (bf16 needs no loss scaling)."""
    bf16 = resolve_precision(device, precision) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=device.type == "cuda")


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    epoch: int, history: list[dict]) -> None:
    """Trainable weights only (safetensors), optimizer and schedule, and where the run stands."""
    from safetensors.torch import save_file

    m = unwrap(model)
    save_file({n: p.detach().cpu().contiguous() for n, p in m.named_parameters() if p.requires_grad},
              str(path / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps({"epochs_done": epoch, "history": history}, default=float))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None) -> tuple[int, list[dict]]:
    from safetensors.torch import load_file

    m = unwrap(model)
    weights = load_file(str(path / "trainable.safetensors"))
    result = m.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit this model: {result.unexpected_keys[:3]}")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    if trainable - set(weights):
        raise ValueError(f"checkpoint {path} lacks trainable weights {sorted(trainable - set(weights))[:3]}")
    if optimizer is not None:
        # On the CPU first: a trial checkpointed on a GPU node may resume on a CPU one (or
        # another GPU index); load_state_dict then moves the state to each parameter's device.
        state = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    st = json.loads((path / "state.json").read_text())
    return st["epochs_done"], st["history"]


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

    from kdray.models import build_student, count_trainable, from_payload

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


# ----------------------------------------------------------------------------- inputs


def distill_inputs(cfg: Any, task: Any, teacher: Any) -> tuple[DistillJob, DistillData]:
    """The job and the shared read-only data of the distillations of `cfg`'s student: the
    search's trials and the final stage's runs alike. The teacher's logits (or, online, its
    weights) come along when any of them distils: `train.alpha` or the space's below 1.

    `teacher` is the teacher stage's `TeacherResult`. The student is tokenized with its own
    tokenizer (cached); cached logits are keyed by example_id, so the teacher's tokenizer may
    differ. Online mode runs the teacher on the student's batches, so it needs the same one.
    With `student.init: teacher` the teacher's weights travel in the data too (workers never
    read the driver's teacher directory).
    """
    from kdray.data import tokenize, tokenizer_identity
    from kdray.errors import UserError
    from kdray.models import from_pretrained_dir, load_tokenizer, to_payload

    train = cfg.train
    distils = train.alpha < 1.0 or cfg.space.alpha[0] < 1.0
    student = cfg.student
    tokenizer = load_tokenizer(student)
    tokenized, _ = tokenize(task, tokenizer, cfg.data.max_length, cfg.cache_dir)
    data = DistillData(Split.from_dataset(tokenized["train"]), Split.from_dataset(tokenized["validation"]))
    if task.transfer is not None:
        data.transfer = Split.from_dataset(tokenize(task, tokenizer, cfg.data.max_length, cfg.cache_dir,
                                                    extra="transfer")[0]["transfer"])
    if distils and train.teacher_logits == "online":
        from transformers import AutoTokenizer

        if tokenizer_identity(AutoTokenizer.from_pretrained(teacher.model_dir)) != tokenizer_identity(tokenizer):
            raise UserError("train.teacher_logits: online mode runs the teacher on the student's batches, "
                            "but they use different tokenizers. Fix: use cached (the default).")
        data.teacher_model = to_payload(from_pretrained_dir(teacher.model_dir))
    elif distils:
        data.teacher_logits = TeacherLogits.from_parquet(teacher.logits_path, teacher.transfer_logits_path)
    if student.init == "teacher":
        data.student_base = (data.teacher_model if data.teacher_model is not None
                             else to_payload(from_pretrained_dir(teacher.model_dir)))
    job = DistillJob(student, train, task.label_names, tokenizer.pad_token_id, cfg.seed)
    return job, data
