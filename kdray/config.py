"""The schema of a `search_spaces/*.yaml` file, loaded with `--set key=value` overrides.

Every problem in a file is collected and raised once as a `UserError` naming the file, the field
and the fix. Relative paths are made absolute at load time (Ray Tune changes the working
directory). Later stages add their sections here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from kdray.errors import UserError


#: Shipped search spaces, addressable by name (`--space smoke`).
SPACES_DIR = Path(__file__).resolve().parent / "search_spaces"
DEFAULT_SPACE = "default"
#: Run names: one path component that stays inside --output-dir.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
#: Budgets above this are typos (`--budget 1e99`): no encoder kdray builds comes near it.
MAX_BUDGET = 1e12

FILE_FORMATS = ("csv", "tsv", "json", "jsonl", "parquet", "phrasebank")
STUDENT_MODES = ("lora", "head", "full")
STUDENT_INITS = ("pretrained", "teacher")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class DataConfig:
    source: str | None = "embedded:rotten_tomatoes"
    """Where the examples come from, split for you: `embedded:rotten_tomatoes`, `embedded:imdb`,
    a local file (.csv, .tsv, .json, .jsonl, .parquet, or a Financial PhraseBank .txt), a
    Hugging Face hub name (`glue/sst2`, `imdb`, `ag_news`, `financial_phrasebank`) or a local
    directory in the hub's layout (read by `datasets.load_dataset`). Leave it
    empty and set `train_file` (and optionally `validation_file`, `test_file`) for one local file
    per split."""
    hub_config: str | None = None
    """Hub dataset configuration name (e.g. `sentences_allagree`); presets fill it in."""
    train_file: str | None = None
    """Local file with the training split (then `source` is ignored)."""
    validation_file: str | None = None
    """Local file with the validation split; carved from train when absent."""
    test_file: str | None = None
    """Local file with the test split; carved from train when absent."""
    format: str | None = None
    """One of csv, tsv, json, jsonl, parquet, phrasebank; inferred from the extension (.txt is
    the Financial PhraseBank `sentence@label` format)."""
    header: bool = True
    """Whether a CSV/TSV file starts with a header row. Without one, columns are positions."""
    encoding: str | None = None
    """Text encoding of local files; UTF-8 when unset (PhraseBank files fall back to latin-1)."""
    text_columns: list[str | int] | None = None
    """Text column(s) by name or 0-based position; several are joined with a space (AG News
    title + description). Unset: `text`, else `sentence`."""
    text_pair_column: str | int | None = None
    """Optional second text column (sentence-pair tasks)."""
    label_column: str | int | None = None
    """Label column by name or 0-based position. Unset: `label`."""
    label_names: list[str] | None = None
    """The label set, in id order. Declared labels are checked: any other value is an error.
    Unset: the hub's class names, else the sorted distinct string labels, else `0..K-1`."""
    label_offset: int | None = None
    """Subtracted from integer labels. Unset: 1 when the labels are exactly 1..K (1-based)."""
    validation_size: float = 0.1
    """Validation rows carved (stratified, seeded) from train when there is no validation split:
    a fraction of the rows being split if < 1, else a count."""
    test_size: float = 0.1
    """Test rows carved from train when there is no test split: a fraction if < 1, else a count."""
    max_train_samples: int | None = None
    """Stratified subsample of train after splitting (the other splits do not change)."""
    max_validation_samples: int | None = None
    """Stratified subsample of validation after splitting."""
    max_test_samples: int | None = None
    """Stratified subsample of test after splitting."""
    unlabeled: str | None = None
    """A transfer set: text the students learn from through the KD term only, labelled once by
    the teacher (cached logits). `rest`: the training rows `max_train_samples` holds back (their
    labels unused); or a local file with the same text column(s) and no labels needed. The
    hard-label term sees labelled rows only, and the no-KD baseline never sees it. Rows whose
    text is also a validation or test text are dropped. Unset: no transfer set."""
    max_unlabeled_samples: int | None = None
    """Seeded random subsample of the transfer set. A KD epoch passes over the labelled rows
    and the transfer set once, so this sets what a KD epoch costs."""
    max_length: int = 128
    """Tokens per example after truncation (no padding until batching)."""
    seed: int = 0
    """Seed of the carved splits and subsamples."""

    def check(self, at: str = "data") -> list[str]:
        p = []
        if self.train_file is None and self.source is None:
            p.append(f"{at}.source: no data given. Fix: set {at}.source (e.g. embedded:rotten_tomatoes) or "
                     f"{at}.train_file.")
        if self.format is not None and self.format not in FILE_FORMATS:
            p.append(f"{at}.format: {self.format!r} is unknown. Fix: use one of {', '.join(FILE_FORMATS)}.")
        for attr in ("validation_size", "test_size"):
            v = getattr(self, attr)
            if v <= 0 or (v >= 1 and v != int(v)):
                p.append(f"{at}.{attr}: {v} is neither a fraction in (0, 1) nor a whole number of rows. Fix: e.g. "
                         f"0.1 or 500.")
        for attr in ("max_train_samples", "max_validation_samples", "max_test_samples", "max_unlabeled_samples"):
            v = getattr(self, attr)
            if v is not None and v < 1:
                p.append(f"{at}.{attr}: {v} must be at least 1. Fix: a row count such as 1000, or unset it for all "
                         f"rows.")
        if self.max_length < 8:
            p.append(f"{at}.max_length: {self.max_length} tokens is too short. Fix: use at least 8 (typically 64-512).")
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            p.append(f"{at}.label_names: {self.label_names} has duplicates. Fix: list each label once.")
        if self.label_names is not None and len(self.label_names) < 2:
            p.append(f"{at}.label_names: a classifier needs at least 2 labels. Fix: list every label, or unset it "
                     f"to read them from the data.")
        return p


@dataclass
class ModelConfig:
    name: str | None = None
    """A hub name (`distilbert-base-uncased`), a local directory, or `embedded:minilm-l6`."""
    config: dict[str, Any] | None = None
    """An inline `transformers` config (with `model_type`) for a randomly initialised model,
    instead of `name` (tests: 2 layers, hidden 32)."""
    keep_layers: list[int] | None = None
    """Keep only these encoder layers of the model, in this order (DistilBERT-style
    initialisation of a smaller student from a pretrained one)."""
    tokenizer: str | None = None
    """Tokenizer name or directory; defaults to `name`. Required with an inline `config`."""

    def check(self, at: str) -> list[str]:
        p = []
        if (self.name is None) == (self.config is None):
            p.append(f"{at}: set exactly one of {at}.name (pretrained) or {at}.config (random init). Fix: e.g. "
                     f"{at}.name: embedded:minilm-l6.")
        if self.config is not None and "model_type" not in self.config:
            p.append(f"{at}.config: no model_type. Fix: add one, e.g. model_type: bert (or distilbert, roberta).")
        if self.config is not None and self.tokenizer is None:
            p.append(f"{at}.tokenizer: a model built from an inline config needs a tokenizer. Fix: e.g. "
                     f"{at}.tokenizer: embedded:minilm-l6.")
        if self.keep_layers is not None:
            if not self.keep_layers:
                p.append(f"{at}.keep_layers: empty. Fix: list at least one layer, or unset it to keep all.")
            elif len(set(self.keep_layers)) != len(self.keep_layers):
                p.append(f"{at}.keep_layers: {self.keep_layers} repeats a layer. Fix: list each layer once.")
        return p


#: LoRA's variants, as PEFT's `LoraConfig` switches them on.
LORA_VARIANTS = ("lora", "rslora", "dora")


@dataclass
class LoraChoice:
    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA's scaling numerator (PEFT's `lora_alpha`): the update is scaled by lora_alpha / r."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input (PEFT's `lora_dropout`)."""
    target_modules: list[str] = field(default_factory=lambda: ["q", "v"])
    """Modules inside each encoder layer that get LoRA: aliases q, k, v, o, ffn_in, ffn_out
    (resolved per architecture) or the architecture's own names relative to the layer
    (e.g. `attention.self.query`)."""
    layers: list[int] | None = None
    """Encoder layers (0-based, of the student) that get LoRA; unset means all."""
    variant: str = "lora"
    """`lora`; `rslora` (PEFT's `use_rslora`: the update scaled by lora_alpha / sqrt(r), which keeps
    high ranks learning); `dora` (PEFT's `use_dora`: each adapted weight split into a trained
    magnitude and a LoRA-updated direction, one more trainable vector per module, counted in
    the budget)."""

    def check(self, at: str) -> list[str]:
        p = []
        if self.variant not in LORA_VARIANTS:
            p.append(f"{at}.variant: {self.variant!r} is unknown. Fix: one of {', '.join(LORA_VARIANTS)}.")
        if self.r < 1:
            p.append(f"{at}.r: rank {self.r} must be at least 1. Fix: e.g. {at}.r: 8.")
        if not 0 <= self.lora_dropout < 1:
            p.append(f"{at}.lora_dropout: {self.lora_dropout} is not in [0, 1). Fix: e.g. 0.1.")
        if not self.target_modules:
            p.append(f"{at}.target_modules: empty. Fix: list modules such as [q, v].")
        if self.layers is not None and not self.layers:
            p.append(f"{at}.layers: empty. Fix: list layers, or unset it for all layers.")
        return p


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over the training split."""
    batch_size: int = 32
    """Examples per step on each worker."""
    eval_batch_size: int = 128
    """Examples per forward pass when evaluating and computing teacher logits."""
    learning_rate: float = 5e-4
    """Peak AdamW learning rate (after linear warmup, then linear decay to 0)."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on biases and LayerNorm)."""
    warmup_ratio: float = 0.06
    """Share of all steps spent warming the learning rate up from 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    alpha: float = 0.5
    """Weight of the hard-label cross-entropy; 1 - alpha weighs the KD term. 1 = no KD."""
    temperature: float = 2.0
    """Softmax temperature of the KD term (its loss is scaled by T^2, Hinton 2015)."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding), shuffled per epoch."""
    teacher_logits: str = "cached"
    """`cached`: read the teacher's logits computed once per (teacher, data); `online`: run the
    teacher forward on every batch (the usual way, kept for benchmarks and equivalence)."""
    precision: str = "auto"
    """Precision of training, validation and teacher logits (weights and optimizer stay fp32):
    `bf16` autocast, `fp32`, or `auto`: bf16 where the device computes it natively (a CUDA GPU
    with bf16; a CPU with AVX512-BF16 or AMX), else fp32 (`kdray.train.precision.resolve_precision`)."""

    def check(self, at: str) -> list[str]:
        p = []
        if self.epochs < 0:
            p.append(f"{at}.epochs: {self.epochs} must be 0 or more. Fix: e.g. {at}.epochs: 3.")
        for attr in ("batch_size", "eval_batch_size"):
            if getattr(self, attr) < 1:
                p.append(f"{at}.{attr}: {getattr(self, attr)} must be at least 1. Fix: e.g. 32.")
        if self.learning_rate <= 0:
            p.append(f"{at}.learning_rate: {self.learning_rate} must be above 0. Fix: e.g. 5e-4.")
        if not 0 <= self.alpha <= 1:
            p.append(f"{at}.alpha: {self.alpha} is not in [0, 1] (the hard-label weight: 1 = labels only, 0 = teacher "
                     f"only). Fix: e.g. 0.5.")
        if self.temperature <= 0:
            p.append(f"{at}.temperature: {self.temperature} must be above 0. Fix: e.g. 2.")
        if not 0 <= self.warmup_ratio < 1:
            p.append(f"{at}.warmup_ratio: {self.warmup_ratio} is not in [0, 1). Fix: e.g. 0.06.")
        if self.teacher_logits not in ("cached", "online"):
            p.append(f"{at}.teacher_logits: {self.teacher_logits!r} is unknown. Fix: cached or online.")
        if self.precision not in PRECISIONS:
            p.append(f"{at}.precision: {self.precision!r} is unknown. Fix: one of {', '.join(PRECISIONS)}.")
        return p


@dataclass
class ResourcesConfig:
    workers: int = 1
    """Ray Train workers per trial (data-parallel: DDP on GPU, gloo on CPU)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved by each worker."""
    gpus_per_worker: float = 0.0
    """GPUs per worker; a fraction lets small students share one GPU (one worker only: DDP
    ranks need whole GPUs). 0: planned from the cluster (`kdray.runtime.resources`)."""
    device: str = "auto"
    """`auto`: GPUs when the Ray cluster has them or its autoscaler can add them (the teacher
    and DDP ranks on whole GPUs; students spread over the GPUs, sharing one only when there are
    more trials than GPUs and memory allows), else CPUs; `cpu`: never a GPU; `gpu`: GPUs, an
    error where none can be had, and a wait for GPU nodes on a cluster still starting them. A
    `gpus_per_worker` above 0 is used as given."""
    gpu_wait_s: float = 900.0
    """How long a run that plans GPUs waits for the first GPU node to join a cluster that has
    none up yet (an autoscaler starting one, worker pods still coming up)."""

    def check(self, at: str) -> list[str]:
        p = []
        if self.workers < 1:
            p.append(f"{at}.workers: {self.workers} must be at least 1. Fix: {at}.workers: 1.")
        if self.cpus_per_worker <= 0:
            p.append(f"{at}.cpus_per_worker: {self.cpus_per_worker} must be above 0. Fix: e.g. 1.")
        if self.gpus_per_worker < 0:
            p.append(f"{at}.gpus_per_worker: {self.gpus_per_worker} is negative. Fix: 0 (planned from the cluster) or "
                     f"a share such as 0.5.")
        if self.device not in ("auto", "cpu", "gpu"):
            p.append(f"{at}.device: {self.device!r} is unknown. Fix: auto, cpu or gpu.")
        if self.gpu_wait_s < 0:
            p.append(f"{at}.gpu_wait_s: {self.gpu_wait_s:g} seconds must be 0 or more. Fix: e.g. 900.")
        return p


@dataclass
class TrainableModelConfig(ModelConfig):
    mode: str = "lora"
    """`lora` (LoRA adapters + trainable head), `head` (frozen encoder, trainable head) or
    `full` (every weight trains)."""
    lora: LoraChoice = field(default_factory=LoraChoice)
    """The LoRA choice used when `mode` is `lora` (the search samples over it)."""


@dataclass
class StudentConfig(TrainableModelConfig):
    init: str = "pretrained"
    """Where the student's weights start: `pretrained` (the checkpoint `name` names, head newly
    initialised) or `teacher`: the fine-tuned teacher's own weights, `keep_layers` of its encoder
    with its embeddings, pooler and classifier (the student must be the teacher's model). The
    frozen encoder then already holds the task, and LoRA and the head adapt it to the removed
    layers. The baselines (no-KD, head-only) start from the same weights, so KD-vs-no-KD still
    measures the KD term alone."""

    def start_text(self) -> str:
        """Where the weights start, as the run's printed lines append it ("" for `pretrained`)."""
        return ", starting from the fine-tuned teacher's weights" if self.init == "teacher" else ""

    def check(self, at: str = "student") -> list[str]:
        p = super().check(at) + self.lora.check(f"{at}.lora")
        if self.mode not in STUDENT_MODES:
            p.append(f"{at}.mode: {self.mode!r} is unknown. Fix: use one of {', '.join(STUDENT_MODES)}.")
        if self.init not in STUDENT_INITS:
            p.append(f"{at}.init: {self.init!r} is unknown. Fix: use one of {', '.join(STUDENT_INITS)}.")
        return p


@dataclass
class TeacherConfig(TrainableModelConfig):
    mode: str = "full"
    """`full` fine-tune, or `lora` for large teachers."""
    fine_tuned: bool = False
    """The model is already fine-tuned on this task: evaluate it and compute its logits only."""
    all_train_data: bool = False
    """Train on every labelled training row, also those `data.max_train_samples` holds back from
    the students (a teacher worth distilling; cached, so only the first run pays). Its logits
    cover those rows too."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, learning_rate=5e-5, alpha=1.0))
    """How the teacher is fine-tuned (alpha is always 1: labels only)."""
    resources: ResourcesConfig | None = None
    """Ray Train resources of the teacher stage; unset: the top-level `resources`. (A one-off
    teacher may take the whole machine, where trials share it.)"""

    def check(self, at: str = "teacher") -> list[str]:
        p = super().check(at) + self.train.check(f"{at}.train")
        if self.mode not in ("full", "lora"):
            p.append(f"{at}.mode: {self.mode!r} is unknown. Fix: use full or lora.")
        if self.mode == "lora":
            p += self.lora.check(f"{at}.lora")
        if self.resources is not None:
            p += self.resources.check(f"{at}.resources")
        return p


@dataclass
class SpaceConfig:
    """What the search samples. Ranges are [low, high]; lists of choices are categorical."""

    alpha: list[float] = field(default_factory=lambda: [0.1, 0.9])
    """KD weight range (alpha weighs the hard-label loss; 1 - alpha the teacher)."""
    temperature: list[float] = field(default_factory=lambda: [1.0, 8.0])
    """Softmax temperature range of the KD term (sampled on a log scale)."""
    learning_rate: list[float] = field(default_factory=lambda: [1e-4, 3e-3])
    """Learning-rate range (log scale)."""
    lora_r: list[int] = field(default_factory=lambda: [4, 8, 16])
    """LoRA ranks to choose from."""
    lora_alpha: list[float] = field(default_factory=lambda: [8.0, 16.0, 32.0])
    """LoRA alpha values to choose from (the update is scaled by alpha / r)."""
    lora_dropout: list[float] = field(default_factory=lambda: [0.0, 0.2])
    """LoRA dropout range."""
    target_modules: list[list[str]] = field(default_factory=lambda: [["q", "v"], ["q", "k", "v", "o"]])
    """Target-module sets to choose from (aliases q, k, v, o, ffn_in, ffn_out)."""
    lora_variant: list[str] = field(default_factory=lambda: ["lora"])
    """LoRA variants to choose from (`student.lora.variant`): lora, rslora, dora."""
    layers: str = "subset"
    """`subset`: each student layer is in or out of LoRA (a subset, not only a count);
    `all`: every layer gets LoRA."""
    epochs: list[int] = field(default_factory=lambda: [3])
    """Epoch counts to choose from (ASHA may stop a trial earlier)."""
    keep_layers: list[list[int]] | None = None
    """Student shapes to choose from: each a `student.keep_layers` (which layers of the model
    the student keeps, in order: its depth and its initialisation), e.g. [[0, 2, 4], [0, 3], [0, 1, 2, 3, 4, 5]].
    Unset: the student's own `keep_layers` only. Each shape's batch-1 latency is measured
    before the search (`kdray.stages.shapes`); `search.latency_budget_ms` / `search.min_speedup` drop the slow ones."""

    def check(self, at: str = "space") -> list[str]:
        p = []
        for attr in ("alpha", "temperature", "learning_rate", "lora_dropout"):
            v = getattr(self, attr)
            if len(v) != 2 or v[0] > v[1]:
                fix = f"[{v[1]}, {v[0]}]" if len(v) == 2 else "[low, high]"
                p.append(f"{at}.{attr}: {v} is not a range [low, high] with low <= high. Fix: {fix}.")
        if len(self.alpha) == 2 and not (0 <= self.alpha[0] and self.alpha[1] <= 1):
            p.append(f"{at}.alpha: {self.alpha} is not within [0, 1] (the hard-label weight). Fix: e.g. [0.1, 0.9].")
        if len(self.temperature) == 2 and self.temperature[0] <= 0:
            p.append(f"{at}.temperature: {self.temperature} must be above 0. Fix: e.g. [1, 8].")
        if len(self.learning_rate) == 2 and self.learning_rate[0] <= 0:
            p.append(f"{at}.learning_rate: {self.learning_rate} must be above 0. Fix: e.g. [1e-4, 3e-3].")
        for attr in ("lora_r", "lora_alpha", "target_modules", "lora_variant", "epochs"):
            if not getattr(self, attr):
                p.append(f"{at}.{attr}: no choice. Fix: list at least one, e.g. {at}.{attr}: "
                         f"{getattr(SpaceConfig(), attr)}.")
        if any(e < 1 for e in self.epochs):
            p.append(f"{at}.epochs: {self.epochs}: every choice must be at least 1. Fix: e.g. [3].")
        if any(r < 1 for r in self.lora_r):
            p.append(f"{at}.lora_r: {self.lora_r}: every rank must be at least 1. Fix: e.g. [4, 8, 16].")
        if any(not ms for ms in self.target_modules):
            p.append(f"{at}.target_modules: every choice needs at least one module. Fix: e.g. [[q, v]].")
        if self.layers not in ("subset", "all"):
            p.append(f"{at}.layers: {self.layers!r} is unknown. Fix: subset or all.")
        unknown = [v for v in self.lora_variant if v not in LORA_VARIANTS]
        if unknown:
            p.append(f"{at}.lora_variant: {unknown} unknown. Fix: choose from {list(LORA_VARIANTS)}.")
        return p + self._check_shapes(at)

    def _check_shapes(self, at: str) -> list[str]:
        if self.keep_layers is None:
            return []
        p = []
        if not self.keep_layers:
            p.append(f"{at}.keep_layers: no shape listed. Fix: list shapes such as [[0, 2, 4], [0, 3]], or unset it.")
        for shape in self.keep_layers:
            if not shape or len(set(shape)) != len(shape):
                p.append(f"{at}.keep_layers: {shape} must list at least one layer, each once. Fix: e.g. [0, 2, 4].")
        if self.layers == "subset":
            p.append(f"{at}.layers: subset picks LoRA layers by position, which is a different layer in each shape "
                     f"of {at}.keep_layers. Fix: {at}.layers: all when shapes are searched.")
        return p


@dataclass
class SearchConfig:
    trials: int = 8
    """Configurations that train (rejected, over-budget ones are not counted)."""
    concurrency: int = 2
    """Trials running at once."""
    grace_period: int = 1
    """ASHA: epochs every trial gets before it can be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the top 1/reduction_factor at each rung."""
    max_failures: int = 1
    """Retries of a failed trial (from its last checkpoint) before it counts as failed."""
    max_rejections: int = 200
    """Over-budget samples tolerated in a row before the search gives up on the space."""
    latency_budget_ms: float | None = None
    """Only student shapes whose batch-1 latency (p50, measured before the search on the device
    the final stage benchmarks on) is at most this many milliseconds (`--latency-budget 5`)."""
    min_speedup: float | None = None
    """Only student shapes at least this many times faster than the teacher at batch 1
    (`--latency-budget 2x`)."""
    reuse_actors: bool = True
    """Tune `reuse_actors`: a finished trial's process runs the next trial of the same shape, so
    imports (~5 s on 2 cores) and on a GPU the CUDA warm-up are paid once per slot, not per trial."""

    def check(self, at: str = "search") -> list[str]:
        p = []
        for attr in ("trials", "concurrency", "grace_period", "max_rejections"):
            if getattr(self, attr) < 1:
                p.append(f"{at}.{attr}: {getattr(self, attr)} must be at least 1. Fix: e.g. "
                         f"{at}.{attr}: {max(1, getattr(SearchConfig(), attr))}.")
        if self.reduction_factor < 2:
            p.append(f"{at}.reduction_factor: {self.reduction_factor} must be at least 2. Fix: e.g. 2.")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            p.append(f"{at}.latency_budget_ms: {self.latency_budget_ms} must be above 0 milliseconds. Fix: e.g. 5, or "
                     f"unset it.")
        if self.min_speedup is not None and self.min_speedup <= 0:
            p.append(f"{at}.min_speedup: {self.min_speedup} must be above 0 (2 = twice as fast as the teacher). Fix: "
                     f"e.g. 2, or unset it.")
        return p


@dataclass
class FinalConfig:
    seeds: int = 3
    """Seeds the best configuration (and each baseline) is retrained with; the best by
    validation is kept, and test metrics are given as mean ± std over the seeds."""
    baselines: bool = True
    """Also train the seeds' baselines: the same student without KD (alpha=1) and the
    frozen-encoder head-only student (same alpha, T, learning rate and epochs)."""
    latency_runs: int = 100
    """Timed batch-1 forward passes per model (after `warmup_runs`), for p50/p95 latency."""
    warmup_runs: int = 10
    """Untimed forward passes before timing."""
    throughput_batch_size: int = 32
    """Batch size of the throughput measurement (the whole test split)."""
    examples_per_bucket: int = 3
    """Misclassified test examples shown per error-analysis bucket."""
    reference: str | None = None
    """A published result the report cites beside the teacher and student (who, model, split)."""
    reference_accuracy: float | None = None
    """That result's accuracy, a fraction."""

    def check(self, at: str = "final") -> list[str]:
        p = []
        for attr in ("seeds", "latency_runs", "throughput_batch_size"):
            if getattr(self, attr) < 1:
                p.append(f"{at}.{attr}: {getattr(self, attr)} must be at least 1. Fix: e.g. "
                         f"{at}.{attr}: {getattr(FinalConfig(), attr)}.")
        for attr in ("warmup_runs", "examples_per_bucket"):
            if getattr(self, attr) < 0:
                p.append(f"{at}.{attr}: {getattr(self, attr)} must be 0 or more. Fix: e.g. "
                         f"{at}.{attr}: {getattr(FinalConfig(), attr)}.")
        return p


#: `serve.runtime`: where the student will run (`kdray.serve.forms.RUNTIMES`, kept here so the
#: config reads without onnxruntime).
SERVE_RUNTIMES = ("pytorch", "onnx", "onnx-int8")


@dataclass
class ServeConfig:
    """The student as it is served: its forms beside `final/student/` (`kdray.serve`)."""

    runtime: str = "onnx-int8"
    """Where the student will run: `pytorch` (fp32 eager), `onnx` (ONNX Runtime fp32) or `onnx-int8`
    (ONNX Runtime, dynamic int8). The student shapes' latencies, `--latency-budget` and the
    report's headline are measured in it. Default onnx-int8: a small classifier is shipped to a CPU
    service, where it is the fastest form and the smallest file; its accuracy is checked on
    every run against the fp32 student, and a form that loses more than `max_accuracy_drop` is not
    recommended."""
    max_accuracy_drop: float = 0.01
    """The most test accuracy (a fraction: 0.01 is 1 point) a form may lose against the fp32
    PyTorch student and still be recommended."""
    export: bool = True
    """Write the ONNX forms in the final stage (`kdray export --run DIR` writes them later)."""

    def check(self, at: str = "serve") -> list[str]:
        p = []
        if self.runtime not in SERVE_RUNTIMES:
            p.append(f"{at}.runtime: {self.runtime!r} is unknown. Fix: one of {', '.join(SERVE_RUNTIMES)}.")
        if not 0 <= self.max_accuracy_drop < 1:
            p.append(f"{at}.max_accuracy_drop: {self.max_accuracy_drop} is not a fraction in [0, 1). Fix: e.g. "
                     f"{at}.max_accuracy_drop: 0.01 (1 point).")
        if self.runtime != "pytorch" and not self.export:
            p.append(f"{at}.export: false, but {at}.runtime: {self.runtime} needs the ONNX forms. Fix: "
                     f"{at}.export: true, or {at}.runtime: pytorch.")
        return p


@dataclass
class RunConfig:
    name: str = "kdray"
    """Run name: the run directory `runs/<name>/` and the wandb group."""
    seed: int = 0
    """Seed of model initialisation and training."""
    budget: int | None = None
    """Trainable-parameter budget of the student (counts parameters, head included)."""
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(name="embedded:minilm-l6"))
    student: StudentConfig = field(default_factory=lambda: StudentConfig(name="embedded:minilm-l6"))
    train: TrainConfig = field(default_factory=TrainConfig)
    """How each student trains (the search overrides the knobs it samples)."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    storage_path: str | None = None
    """Where Ray Tune and Ray Train write experiments and trial checkpoints, under `<name>/`: a
    URI (`s3://bucket/kdray`) or a path every node mounts. Unset: the run directory, which only
    one machine sees."""
    cache_dir: str | None = None
    """Cache of tokenized data, teachers and logits; unset: `$KDRAY_CACHE` or `~/.cache/kdray`."""
    source_file: str | None = None
    """The YAML file this config came from (set by the loader, for messages)."""

    def check(self) -> list[str]:
        """Every problem of the config: each section's own (`check` of each), then what involves
        several sections. Collected, not raised, so a file's mistakes are reported at once."""
        p = []
        if not SAFE_NAME.fullmatch(self.name):
            p.append(f"name: {self.name!r} is not a safe directory name: use letters, digits, '.', '_' and '-', not "
                     f"starting with '.' or '-'. Fix: e.g. --name my-run.")
        if self.budget is not None and self.budget < 1:
            p.append(f"budget: {self.budget} trainable parameters is not a budget: it must be positive. "
                     f"Fix: e.g. --budget 1e6.")
        if self.budget is not None and self.budget > MAX_BUDGET:
            p.append(f"budget: {self.budget:.3g} trainable parameters is more than any student kdray can build "
                     f"(at most {MAX_BUDGET:.0e}). Fix: e.g. --budget 1e6.")
        p += self.data.check() + self.teacher.check() + self.student.check() + self.train.check("train")
        p += self.resources.check("resources") + self.space.check() + self.search.check() + self.final.check()
        p += self.serve.check()
        return p + self._check_student_start()

    def _check_student_start(self) -> list[str]:
        """`student.init: teacher` needs the student to be the teacher's model."""
        s, t = self.student, self.teacher
        if s.init != "teacher":
            return []
        differ = [f for f in ("name", "config", "tokenizer") if getattr(s, f) != getattr(t, f)]
        if not differ:
            return []
        pairs = "; ".join(f"student.{f} {getattr(s, f)!r}, teacher.{f} {getattr(t, f)!r}" for f in differ)
        return [f"student.init: teacher starts the student from the fine-tuned teacher's weights, so the student must "
                f"be the teacher's model, but they differ ({pairs}). Fix: give the student the teacher's "
                f"{' and '.join(differ)} (keep_layers picks its layers), or set student.init: pretrained "
                f"(--set student.init=pretrained)."]

    def repeat_seeds(self, n: int) -> range:
        """The seeds of `n` runs of one configuration: `seed`, `seed + 1`, ... The final stage
        retrains with them, and `kdray distill --seeds` repeats a trial with the same ones."""
        return range(self.seed, self.seed + n)


# ----------------------------------------------------------------------------- loading


def shipped_spaces() -> list[str]:
    """Names of the spaces that ship with kdray (`--space NAME`)."""
    return sorted(q.stem for q in SPACES_DIR.glob("*.yaml"))








def resolve_space_path(space: str | os.PathLike | None) -> Path:
    """A path to a YAML file, or the name of a shipped space (`smoke`, `default`, ...)."""
    if space is None:
        space = DEFAULT_SPACE
    p = Path(space).expanduser()
    if p.is_file():
        return p.resolve()
    shipped = SPACES_DIR / f"{space}.yaml"
    if p.suffix == "" and shipped.is_file():
        return shipped
    raise UserError(f"--space {space}: no such file, and not a shipped space. Fix: give a YAML path "
                    f"or one of: {', '.join(shipped_spaces())}.")


def load_config(space: str | os.PathLike | None = None, overrides: list[str] | None = None,
                budget: float | None = None, flags: dict[str, tuple[Any, str]] | None = None) -> RunConfig:
    """Load a search-space YAML (path or shipped name), apply `key=value` overrides, validate.

    `flags` maps a field (`search.trials`) to the value a command-line flag gave it and the flag
    as the user typed it (`--trials 0`): a problem with that field names the flag, not the file.
    """
    path = resolve_space_path(space)
    raw = read_space(path)
    problems: list[str] = []
    origin: dict[str, str] = {}  # field -> the flag that set it
    for item in overrides or []:
        key = apply_override(raw, item, problems)
        if key is not None:
            origin[key] = f"--set {item}"
    flags = dict(flags or {})
    if budget is not None:
        flags["budget"] = (budget, f"--budget {budget:g}")
    for key, (value, label) in flags.items():
        _set_field(raw, key.split("."), value)
        origin[key] = label
    cfg = _build(RunConfig, raw, "", problems)
    cfg.source_file = str(path)
    cfg.flag_origins = origin  # not a field: later checks name the flag (`origin_of`)
    problems += cfg.check()  # fields that failed to parse keep their defaults here
    if problems:
        raise _attributed(problems, origin, str(path))
    _absolutize_paths(cfg)
    return cfg


#: What a `best_config.yaml` says about its trial beside the knobs: facts, not settings, so a
#: space built on it (it names its run's config.yaml as `base`) skips them.
TRIAL_FACTS = ("trial_id", "best_val_accuracy", "trainable_params")


def read_space(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A space file as raw data, with its `base:` (a shipped space's name or a path relative to
    the file) read first and this file's sections merged over it, the way `--set` changes it."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"not valid YAML: {e}. Fix: correct the file's syntax.", where=str(path)) from None
    if not isinstance(raw, dict):
        raise UserError("the top level must be a mapping of sections (data, teacher, student, ...). Fix: start "
                        "each section at column 0 as `section:` with its fields indented under it.",
                        where=str(path))
    base = raw.pop("base", None)
    if base is None:
        return raw
    for key in TRIAL_FACTS:
        raw.pop(key, None)
    relative = path.parent / str(base)
    try:
        base_path = relative.resolve() if relative.is_file() else resolve_space_path(str(base))
    except UserError:
        raise UserError(f"base: {base}: no such file next to this one, and not a shipped space. Fix: a path "
                        f"relative to this file, or one of: {', '.join(shipped_spaces())}.", where=str(path)) from None
    if base_path in seen or base_path == path.resolve():
        raise UserError(f"base: {base} leads back to this file. Fix: break the cycle.", where=str(path))
    return _merged(read_space(base_path, (*seen, path.resolve())), raw)


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def origin_of(cfg: Any, field_name: str) -> str:
    """Where `field_name`'s value came from, for a later check's error: the flag that set it
    (`--set student.keep_layers=[0,9]`), else the space file."""
    return _flag_for(getattr(cfg, "flag_origins", {}), field_name) or cfg.source_file


def _flag_for(origins: dict[str, str], field_name: str) -> str | None:
    """The flag that set `field_name` or a section holding it, else None."""
    for key, label in origins.items():
        if field_name == key or field_name.startswith(key + "."):
            return label
    return None


def _attributed(problems: list[str], origin: dict[str, str], path: str) -> UserError:
    """One error for all `problems`, each named by where its value came from: the flag that set
    the field (`--set data.max_length=-1: ...`), else the file."""
    def flag_of(problem: str) -> str | None:
        if problem.startswith("--"):  # a malformed flag: the problem names it already
            return ""
        return _flag_for(origin, problem.split(":", 1)[0].split(" ", 1)[0])

    labels = [flag_of(p) for p in problems]
    if all(label is None for label in labels):
        return UserError(problems, where=path)
    return UserError([p if label == "" else f"{label} ({p})" if label else f"{p} (in {path})"
                      for p, label in zip(problems, labels)])


def _set_field(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def apply_override(raw: dict, item: str, problems: list[str]) -> str | None:
    """Apply one `--set a.b.c=value` (value parsed as YAML) to the raw mapping; returns the
    field it set (`a.b.c`), or None when `item` is malformed (a problem is added)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        problems.append(f"--set {item!r}: expected key=value. Fix: e.g. --set data.max_length=64.")
        return None
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(f"--set {item!r}: {part} is not a section. Fix: set `{part}=value` itself, or name "
                            f"a field of a section (`kdray search --help` lists them).")
            return None
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        problems.append(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}). Fix: quote it, "
                        f"e.g. --set 'data.text_columns=[review]'.")
        return None
    return key.strip()


def to_dict(cfg: Any) -> dict:
    """The config as plain data (what `config.yaml` of a run holds)."""
    d = dataclasses.asdict(cfg)
    d.pop("source_file", None)
    return d


def _absolutize_paths(cfg: RunConfig) -> None:
    if cfg.storage_path is not None and "://" not in cfg.storage_path:
        cfg.storage_path = str(Path(os.path.expandvars(cfg.storage_path)).expanduser().resolve())
    d = cfg.data
    for attr in ("train_file", "validation_file", "test_file"):
        v = getattr(d, attr)
        if v is not None:
            setattr(d, attr, str(Path(os.path.expandvars(v)).expanduser().resolve()))
    if d.source is not None and looks_like_path(d.source):
        d.source = str(Path(os.path.expandvars(d.source)).expanduser().resolve())
    if d.unlabeled is not None and d.unlabeled != UNLABELED_REST:
        d.unlabeled = str(Path(os.path.expandvars(d.unlabeled)).expanduser().resolve())
    for m in (cfg.teacher, cfg.student):
        for attr in ("name", "tokenizer"):
            v = getattr(m, attr)
            if v is not None and not v.startswith("embedded:") and Path(os.path.expandvars(v)).expanduser().exists():
                setattr(m, attr, str(Path(os.path.expandvars(v)).expanduser().resolve()))
    if cfg.cache_dir is not None:
        cfg.cache_dir = str(Path(os.path.expandvars(cfg.cache_dir)).expanduser().resolve())


#: `data.unlabeled` naming the held-back training rows rather than a file.
UNLABELED_REST = "rest"

FILE_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl",
                   ".parquet": "parquet", ".txt": "phrasebank"}


def looks_like_path(source: str) -> bool:
    """A data source is a local file if it has a known data-file extension or exists on disk."""
    p = Path(os.path.expandvars(source)).expanduser()
    return p.suffix.lower() in FILE_EXTENSIONS or p.exists() or source.startswith((".", "/", "~"))


# ----------------------------------------------------------------------------- typed building


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and value types into `problems`."""
    where = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping, got {raw!r}. Fix: write its fields as `field: value` "
                        f"lines indented under `{where}:`.")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"Did you mean {close[0]!r}? Fix: rename it to {close[0]!r}" if close else \
                f"Fix: use one of: {', '.join(fields)}"
            problems.append(f"{prefix}{key}: unknown field. {hint}.")
            continue
        tp = hints[key]
        nested = _dataclass_of(tp)
        if nested is not None and (value is not None or tp is nested):
            kwargs[key] = _build(nested, value, f"{prefix}{key}.", problems)
            continue
        ok, converted = _coerce(value, tp)
        if not ok:
            problems.append(f"{prefix}{key}: {_type_problem(value, tp)}")
            continue
        kwargs[key] = converted
    obj = cls(**kwargs)
    return obj


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass in `tp` (`X` or `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if found else None
    return None


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, None
    if tp is type(None):
        return value is None, None
    if tp is Any:
        return True, value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, None
        out = []
        for v in value:
            ok, c = _coerce(v, item_tp)
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        # 1e6 in YAML is a float (or even a string): accept integral values.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False, None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value != int(value):
            return False, None
        return True, int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, None
        return True, float(value)
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _type_problem(value: Any, tp: Any) -> str:
    """Why `value` is not a `tp`, and the fix, with an example of the right form."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} is not a finite number. Fix: give a finite number, e.g. 1e6."
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    kind = args[0] if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1 else tp
    if typing.get_origin(kind) is list:
        item_ok, _ = _coerce(value, typing.get_args(kind)[0])
        example = f"[{value}]" if item_ok else "[8, 16]"
        return f"{value!r} is not {_type_name(tp)}. Fix: write a list, e.g. {example}."
    example = {int: "64", float: "0.5", str: "'text' (quoted)", bool: "true"}.get(kind, "a value of that type")
    return f"{value!r} is not {_type_name(tp)}. Fix: e.g. {example}."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, _type_name(item))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


# ----------------------------------------------------------------------------- value checks


def student_shapes(cfg: RunConfig) -> list[list[int] | None]:
    """The student shapes a search chooses from: `space.keep_layers`, else the student's own
    (None: every layer of the model)."""
    if cfg.space.keep_layers:
        return [list(shape) for shape in cfg.space.keep_layers]
    return [cfg.student.keep_layers]
