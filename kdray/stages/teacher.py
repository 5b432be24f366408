"""Teacher stage: fine-tune (or take) the teacher, evaluate it, and compute its logits once.

The teacher trains with the distillation loop itself (`alpha=1`: labels only) through the trial
engine (one Tune trial: in its own process with one worker, on Ray Train workers with several).
Its logits on train and validation are computed by the same process(es) right after training,
each on its shard, while the trained weights are still in memory: a separate Ray Data job would
pay a second start-up (~10-20 s here) and reload the model for no gain. Everything is
cached under a fingerprint of what determines it (teacher spec and training, tokenizer, data,
max_length, seed): a second run trains nothing and says so.

    kdray teacher --space FILE [--set key=value ...]
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdray import metrics as M
from kdray.cache import cache_root, cached_dir, fingerprint
from kdray.config import RunConfig, to_dict
from kdray.data.load import TaskData
from kdray.data.tokenize import tokenize, tokenizer_identity


MODEL_DIR, LOGITS_FILE, RECORD_FILE = "model", "logits.parquet", "record.json"


@dataclass
class TeacherResult:
    """The teacher stage's output: a cache entry holding the model, its logits and a record."""

    path: Path
    record: dict[str, Any]
    """Validation metrics, timings, what it was built from."""
    cache_hit: bool
    """True when this call found the entry and trained nothing."""
    transfer_logits_path: Path | None = None
    """Parquet like `logits_path`, split `transfer`: the teacher's logits on the transfer set
    (`data.unlabeled`) where its own logits do not cover it; None otherwise."""

    @property
    def model_dir(self) -> Path:
        """A Hugging Face model directory (safetensors + tokenizer), LoRA merged."""
        return self.path / MODEL_DIR

    @property
    def logits_path(self) -> Path:
        """Parquet: example_id, split (train/validation), logits (list<float32>)."""
        return self.path / LOGITS_FILE


def teacher_fingerprint(cfg: RunConfig, task: TaskData, tokenizer: Any) -> str:
    # `all_train_data` enters the key only when it changes what trains: teachers cached before
    # the field existed keep their keys.
    spec = {k: v for k, v in to_dict(cfg.teacher).items() if k != "all_train_data"}
    extra = [("all_train_data", task.rest_fingerprint)] if _uses_rest(cfg, task) else []
    return fingerprint("teacher-v1", spec, task.fingerprint, tokenizer_identity(tokenizer),
                       cfg.data.max_length, cfg.seed, *extra)


def _uses_rest(cfg: RunConfig, task: TaskData) -> bool:
    """The teacher trains on the rows `data.max_train_samples` holds back from the students."""
    return cfg.teacher.all_train_data and task.rest is not None and not cfg.teacher.fine_tuned


def prepare_teacher(cfg: RunConfig, task: TaskData, *, plan: Any = None, storage_path: str | Path | None = None,
                    log: bool = True) -> TeacherResult:
    """Return the cached teacher for (teacher, data), training it on Ray on a miss with what
    `plan` (the teacher's `kdray.runtime.resources.Plan`) holds; without one, planned on the running Ray."""
    from kdray.train.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.teacher)
    key = teacher_fingerprint(cfg, task, tokenizer)
    root = cache_root(cfg.cache_dir)
    say = print if log else (lambda *a, **k: None)

    def build(tmp: Path) -> None:
        say(f"teacher: no cached teacher {key}; {'evaluating' if cfg.teacher.fine_tuned else 'fine-tuning'} "
            f"{cfg.teacher.name or 'the inline config'} on {task.description}"
            + (f", plus the {len(task.rest):,} training rows the students do not see" if _uses_rest(cfg, task) else ""))
        _train_on_ray(cfg, task, tokenizer, tmp, storage_path, key, _plan(cfg, plan))
        tokenizer.save_pretrained(tmp / MODEL_DIR)

    path, hit = cached_dir("teacher", key, build, root=root)
    record = json.loads((path / RECORD_FILE).read_text())
    if hit:
        say(f"teacher: cache hit {path} (trained nothing): val accuracy {record[M.VAL_ACCURACY]:.4f}")
    else:
        say(f"teacher: cached at {path}: val accuracy {record[M.VAL_ACCURACY]:.4f}, "
            f"trained in {record['train_seconds']:.0f}s, logits in {record['logits_seconds']:.0f}s")
    result = TeacherResult(path, record, hit)
    if task.transfer is not None:
        result.transfer_logits_path = _transfer_logits(cfg, task, tokenizer, result, key, say, plan)
    return result


def _plan(cfg: RunConfig, plan: Any) -> Any:
    """The teacher's plan: as given, else made on the running Ray (started here if need be)."""
    if plan is not None:
        return plan
    from kdray.runtime.cluster import init_ray
    from kdray.runtime.resources import plan_run, read_view

    init_ray()
    return plan_run(cfg, read_view()).teacher


def _transfer_logits(cfg: RunConfig, task: TaskData, tokenizer: Any, teacher: TeacherResult, key: str,
                     say: Any, plan: Any) -> Path | None:
    """The teacher's logits on the transfer set, computed once and cached beside the teacher's
    (a new transfer set never retrains the teacher). None when the teacher's own logits cover it:
    `rest` with `all_train_data`. Computed by a Ray task on the teacher's kind of device."""
    import pyarrow.parquet as pq

    from kdray.runtime.tasks import on_device
    from kdray.train.batches import Split
    from kdray.train.logits import write_logits
    from kdray.train.models import from_pretrained_dir, to_payload

    have = pq.read_table(teacher.logits_path, columns=["example_id"])["example_id"].to_numpy()
    if np.isin(task.transfer["example_id"], have).all():
        return None

    def build(tmp: Path) -> None:
        tokenized, _ = tokenize(task, tokenizer, cfg.data.max_length, cfg.cache_dir, extra="transfer")
        rows = Split.from_dataset(tokenized["transfer"])
        teacher_plan = _plan(cfg, plan)
        say(f"teacher: labelling the transfer set ({len(rows):,} rows) on {'a GPU' if teacher_plan.on_gpu else 'CPUs'}")
        t0 = time.perf_counter()
        logits, where = on_device(teacher_plan, label_rows, to_payload(from_pretrained_dir(teacher.model_dir)), rows,
                                  cfg.teacher.train.eval_batch_size, tokenizer.pad_token_id, cfg.teacher.train.precision)
        write_logits(tmp / LOGITS_FILE, {"transfer": (rows.example_ids, logits)})
        (tmp / "placement.json").write_text(json.dumps(where))
        say(f"teacher: transfer set labelled in {time.perf_counter() - t0:.0f}s on {where['device_name']}")

    path, hit = cached_dir("transfer-logits", fingerprint("transfer-logits-v1", key, task.transfer_fingerprint),
                           build, root=cache_root(cfg.cache_dir))
    if hit:
        say(f"teacher: transfer-set logits cached at {path}")
    return path / LOGITS_FILE


def label_rows(device: Any, teacher: dict, rows: Any, batch_size: int, pad_id: int, precision: str) -> np.ndarray:
    """The task body: the teacher's (a `to_payload`) logits on `rows` on `device`."""
    from kdray.train.loop import predict_logits
    from kdray.train.models import from_payload

    return predict_logits(from_payload(teacher).to(device), rows, batch_size, pad_id, device,
                          progress=_progress("teacher logits (transfer)"), precision=precision)


def _train_on_ray(cfg: RunConfig, task: TaskData, tokenizer: Any, out: Path, storage_path: Any, key: str,
                  plan: Any) -> None:
    import ray

    from kdray.runtime.engine import TrialSpec, run_one
    from kdray.train.batches import Split
    from kdray.train.loop import DistillData, DistillJob

    tokenized, _ = tokenize(task, tokenizer, cfg.data.max_length, cfg.cache_dir)
    rows = Split.from_dataset(tokenized["train"])
    if _uses_rest(cfg, task):
        held_back, _ = tokenize(task, tokenizer, cfg.data.max_length, cfg.cache_dir, extra="rest")
        rows = rows.concat(Split.from_dataset(held_back["rest"]))
    data = DistillData(rows, Split.from_dataset(tokenized["validation"]))
    train = dataclasses.replace(cfg.teacher.train, alpha=1.0, teacher_logits="cached")
    job = DistillJob(cfg.teacher, train, task.label_names, tokenizer.pad_token_id, cfg.seed)
    storage = str(storage_path or Path(tempfile.gettempdir()) / "kdray-train")
    print(plan.line(cfg.teacher.train.precision), flush=True)
    spec = TrialSpec(teacher_entry, job, ray.put(data), plan.resources, storage)
    result = run_one(spec, f"teacher-{key}")
    with result.checkpoint.as_directory() as d:
        for name in (MODEL_DIR, LOGITS_FILE, RECORD_FILE):
            src = Path(d) / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, out / name)


def teacher_entry(job: Any, data: Any, worker: Any) -> None:
    """The engine entry of the teacher (`worker`: a `kdray.runtime.engine.Worker`): fine-tune, evaluate,
    compute logits on this rank's shard, and (rank 0) report model + logits + record as the
    run's last checkpoint."""
    import torch.distributed as dist

    from kdray.runtime.engine import distill_entry
    from kdray.train.logits import write_logits
    from kdray.train.loop import predict_logits, score_logits
    from kdray.train.models import build_model, merged

    rank, world, device = worker.rank, worker.world_size, worker.device
    t0 = time.perf_counter()
    if job.model.fine_tuned or job.train.epochs == 0:
        model = build_model(job.model, job.num_labels, job.label_names, device=device, seed=job.seed)
    else:
        model = distill_entry(job, data, worker).model
    model = merged(model)  # a LoRA teacher is saved, and its logits computed, merged
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    parts = {}
    for split_name, split in (("train", data.train), ("validation", data.validation)):
        mine = np.arange(rank, len(split), world)
        progress = _progress(f"teacher logits ({split_name})") if rank == 0 else None
        logits = predict_logits(model, split, job.train.eval_batch_size, job.pad_token_id, device, mine, progress,
                                precision=job.train.precision)
        if split_name == "validation":  # the teacher's validation metrics, from the same logits
            val = score_logits(logits, split.labels[mine], job.num_labels, device, world)
        shard = (split.example_ids[mine], logits)
        if world > 1:
            shards: list = [None] * world
            dist.all_gather_object(shards, shard)
            shard = (np.concatenate([s[0] for s in shards]), np.concatenate([s[1] for s in shards]))
        parts[split_name] = shard
    logits_seconds = time.perf_counter() - t1
    record = {**val, "train_seconds": train_seconds, "logits_seconds": logits_seconds, "workers": world,
              "device": str(device), "placement": worker.placement.as_dict() if worker.placement else None,
              "epochs": 0 if job.model.fine_tuned else job.train.epochs,
              "label_names": job.label_names, "model": job.model.name or "inline config",
              "train_examples": len(data.train)}
    with tempfile.TemporaryDirectory(prefix="kdray-teacher-") as tmp:
        if rank == 0:
            model.save_pretrained(Path(tmp) / MODEL_DIR, safe_serialization=True)
            write_logits(Path(tmp) / LOGITS_FILE, parts)
            (Path(tmp) / RECORD_FILE).write_text(json.dumps(record, indent=2))
        worker.report({**val, M.STATUS: "teacher_done"}, tmp if rank == 0 else None)


def _progress(what: str):
    from kdray.train.loop import say

    start = time.perf_counter()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] < 10 and done < total:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9)
        say(f"{what}: {done}/{total} ({100 * done / total:.0f}%), {rate:.0f} examples/s, "
            f"eta {(total - done) / max(rate, 1e-9):.0f}s")

    return show
