"""Data stage: turn a dataset spec into train/validation/test with one shape.

Every source ends as a `datasets.DatasetDict` with splits `train`, `validation`, `test` and
columns `text` (str), optional `text_pair` (str), `label` (int in 0..K-1) and `example_id`
(int, stable across runs: the row's position in its source), plus the label names.

The test split is sealed: `TaskData.splits` holds train and validation only, which is all the
teacher and the search may read; `TaskData.read_test(reader)` opens the test split and records
who did (the final stage, once). The search writes that record into `search/summary.json` when it
ends, so a run shows that selection never read the test split.

Splits that a source lacks are carved from train, stratified by label and seeded
(`data.seed`). `embedded:*` sources ship a single split (Rotten Tomatoes 8,530 sentences ->
6,824 / 853 / 853; IMDb 25,000 reviews -> 20,000 / 2,500 / 2,500 with the default 10 % / 10 %).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kdray.config import UNLABELED_REST, DataConfig
from kdray.data.read import SELECTION_SPLITS, SPLITS, check_texts, few, read_file, read_source, select_columns
from kdray.errors import UserError


#: example_id of a transfer-file row: this plus its row, so it never meets a labelled row's id
#: (a position in its source) in the teacher's logits.
TRANSFER_ID_BASE = 1 << 40
#: The label of a transfer row: the hard-label term skips it (`kdray.train.loss.kd_loss`).
UNLABELED = -1


@dataclass
class TaskData:
    """The data stage's output."""

    splits: Any
    """`datasets.DatasetDict` train/validation (no test: see `read_test`) with text,
    [text_pair], label, example_id."""
    label_names: list[str]
    fingerprint: str
    """Hash of all three splits' content: keys every cache built on this data."""
    description: str
    """Where the data came from and the split sizes, for logs and reports."""
    sealed_test: Any = None
    """The test split (`datasets.Dataset`); read it through `read_test`."""
    test_reads: list[str] = field(default_factory=list)
    """Who opened the test split, in order."""
    rest: Any = None
    """The labelled training rows `data.max_train_samples` held back from the students
    (`datasets.Dataset`, same columns as train), or None when nothing was held back. A teacher
    with `all_train_data` trains on train + rest."""
    rest_fingerprint: str | None = None
    """Hash of `rest`'s content (keys the caches built on it)."""
    transfer: Any = None
    """The transfer set (`data.unlabeled`): rows the students see in the KD term only
    (`datasets.Dataset`, same columns as train, every label `UNLABELED`), or None."""
    transfer_fingerprint: str | None = None
    """Hash of `transfer`'s content."""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def read_test(self, reader: str) -> Any:
        """The test split, recording that `reader` (a stage's name) opened it."""
        self.test_reads.append(reader)
        return self.sealed_test


def split_texts(split: Any) -> list:
    """A split's raw texts as a tokenizer takes them: the texts, or (text, text_pair) pairs."""
    if "text_pair" in split.column_names:
        return list(zip(split["text"], split["text_pair"]))
    return list(split["text"])


def load_data(cfg: DataConfig) -> TaskData:
    """Load, validate, map labels, split and subsample. Raises `UserError` on bad input."""
    frames, where, hub_label_names = read_source(cfg)
    frames = {split: select_columns(df, cfg, where[split]) for split, df in frames.items()}
    label_names = _map_labels(frames, cfg, where, hub_label_names)
    for split, df in frames.items():
        check_texts(df, where[split], cfg)
    frames = _complete_splits(frames, cfg, len(label_names), where)
    train_before_cap = frames["train"]
    frames = _subsample(frames, cfg)
    rest = train_before_cap[~train_before_cap["example_id"].isin(frames["train"]["example_id"])].reset_index(drop=True)
    from datasets import Dataset, DatasetDict

    dd = DatasetDict({s: Dataset.from_pandas(frames[s], preserve_index=False) for s in SELECTION_SPLITS})
    fp = _content_fingerprint(frames, label_names)
    sizes = " / ".join(f"{s} {len(frames[s]):,}" for s in SPLITS)
    desc = f"{cfg.source if cfg.train_file is None else cfg.train_file}: {sizes}, {len(label_names)} labels"
    held_back = {}
    if len(rest):
        held_back = {"rest": Dataset.from_pandas(rest, preserve_index=False),
                     "rest_fingerprint": _content_fingerprint({"rest": rest}, label_names, ("rest",))}
    if cfg.unlabeled == UNLABELED_REST and not len(rest):
        # Not an error: the default space sets `rest`, and on a data set no larger than its
        # max_train_samples every row is labelled for the students, so there is nothing to add.
        desc += f"; no transfer set (data.unlabeled: rest, but all {len(frames['train']):,} training rows train the students)"
    elif cfg.unlabeled is not None:
        transfer, dropped = _transfer_set(cfg, rest, frames)
        held_back |= {"transfer": Dataset.from_pandas(transfer, preserve_index=False),
                      "transfer_fingerprint": _content_fingerprint({"transfer": transfer}, label_names, ("transfer",))}
        desc += (f"; transfer set {len(transfer):,} unlabeled rows ({cfg.unlabeled})"
                 + (f", {dropped:,} dropped as validation or test texts" if dropped else ""))
    return TaskData(splits=dd, label_names=label_names, fingerprint=fp, description=desc,
                    sealed_test=Dataset.from_pandas(frames["test"], preserve_index=False), **held_back)


def _transfer_set(cfg: DataConfig, rest: pd.DataFrame, frames: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, int]:
    """The transfer set's rows (text [, text_pair], label `UNLABELED`, example_id) and how many
    were dropped because validation or test holds the same text: KD on them would show the
    student the teacher's answers on rows it is selected or scored on."""
    columns = ["text", "text_pair"] if "text_pair" in frames["train"] else ["text"]
    if cfg.unlabeled == UNLABELED_REST:
        df = rest[columns + ["example_id"]].copy()
    else:
        raw = read_file(cfg.unlabeled, cfg, "data.unlabeled")
        df = select_columns(raw, cfg, cfg.unlabeled, label=False)
        check_texts(df, cfg.unlabeled, cfg)
        df["example_id"] = TRANSFER_ID_BASE + np.arange(len(df), dtype="int64")
        df = df.reset_index(drop=True)
    seen = set()
    for split in ("validation", "test"):
        seen |= set(_keys(frames[split], columns))
    keep = ~pd.Series(_keys(df, columns)).isin(seen).to_numpy()
    dropped = int((~keep).sum())
    df = df[keep]
    if not len(df):
        raise UserError(f"data.unlabeled: {cfg.unlabeled}: every row's text is also a validation or test text. "
                        f"Fix: point data.unlabeled at text the task's splits do not hold.")
    cap = cfg.max_unlabeled_samples
    if cap is not None and cap < len(df):
        df = df.sample(n=cap, random_state=cfg.seed).sort_values("example_id")
    df = df.reset_index(drop=True)
    df.insert(len(columns), "label", np.full(len(df), UNLABELED, dtype="int64"))
    return df, dropped


def _keys(df: pd.DataFrame, columns: list[str]) -> list:
    return list(zip(*(df[c].str.strip() for c in columns)))


def _as_int(v: Any) -> int | None:
    """An integer label (also '3' or 3.0), else None."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    return None


def _map_labels(frames: dict[str, pd.DataFrame], cfg: DataConfig, where: dict[str, str],
                hub_names: list[str] | None) -> list[str]:
    """Map raw labels to ids 0..K-1 in place; return the label names."""
    values = pd.concat([df["label"] for df in frames.values()])
    declared = cfg.label_names
    all_int = values.map(_as_int).notna().all()
    # String labels, or integers that spell the declared names ("1", "2" in label_names): by name.
    if not all_int or (declared is not None and values.map(str).isin(declared).all()):
        names = declared or sorted({str(v) for v in values})
        index = {n: i for i, n in enumerate(names)}
        for split, df in frames.items():
            bad = sorted({str(v) for v in df["label"] if str(v) not in index})
            if bad:
                raise UserError(f"{where[split]}: label value(s) {few(bad)} are not in data.label_names "
                                f"{names}. Fix: add them to data.label_names, or correct the rows.")
            df["label"] = df["label"].map(lambda v: index[str(v)]).astype("int64")
        return list(names)
    ids = values.map(_as_int).astype("int64")
    names = declared or hub_names
    offset = cfg.label_offset
    if offset is None:
        k = len(names) if names is not None else ids.max()
        uniq = set(ids.unique().tolist())
        offset = 1 if 0 not in uniq and uniq and min(uniq) == 1 and max(uniq) == k else 0
    n = len(names) if names is not None else int(ids.max()) - offset + 1
    for split, df in frames.items():
        mapped = df["label"].map(_as_int).astype("int64") - offset
        bad = sorted({int(v) + offset for v in mapped if not 0 <= v < n})
        if bad:
            allowed = f"{offset}..{n - 1 + offset}"
            fix = ("Fix: correct the rows, or list every label in data.label_names."
                   if names is not None else "Fix: labels must be 0..K-1 (or 1..K); correct the rows.")
            raise UserError(f"{where[split]}: label value(s) {few(bad)} are outside the label set "
                            f"{allowed}{f' {names}' if names else ''}. {fix}")
        df["label"] = mapped
    return list(names) if names is not None else [str(i) for i in range(n)]


def _rows(size: float, total: int) -> int:
    return int(round(size * total)) if size < 1 else int(size)


def _complete_splits(frames: dict[str, pd.DataFrame], cfg: DataConfig, k: int,
                     where: dict[str, str]) -> dict[str, pd.DataFrame]:
    """Carve the missing validation/test splits from train, stratified and seeded."""
    from sklearn.model_selection import train_test_split

    train = frames["train"]
    counts = train["label"].value_counts()
    if len(counts) < 2:
        raise UserError(f"{where['train']}: every training row has the same label "
                        f"({counts.index[0] if len(counts) else 'none'}). Fix: a classifier needs at least "
                        f"two classes; check data.label_column.")
    missing = [s for s in ("test", "validation") if s not in frames]
    total = len(train)
    need = {s: _rows(getattr(cfg, f"{s}_size"), total) for s in missing}
    n_classes = len(counts)
    left = total - sum(need.values())
    if missing and (min(need.values()) < n_classes or left < n_classes or counts.min() < len(missing) + 1):
        sizes = ", ".join(f"{s}_size={getattr(cfg, f'{s}_size')} -> {need[s]} rows" for s in missing)
        raise UserError(f"{where['train']}: {total} rows ({n_classes} classes, smallest has {counts.min()}) "
                        f"are too few to carve {sizes}: every split needs at least one row of each class. "
                        f"Fix: add rows, provide validation/test files, or raise the split sizes.")
    for split in missing:
        rest, carved = train_test_split(train, test_size=need[split], random_state=cfg.seed,
                                        stratify=train["label"])
        frames[split], train = carved.sort_index(), rest.sort_index()
    frames["train"] = train
    for split in SPLITS:
        df = frames[split]
        df.insert(len(df.columns), "example_id", df.index.to_numpy(dtype="int64"))
        frames[split] = df.reset_index(drop=True)
    return frames


def _subsample(frames: dict[str, pd.DataFrame], cfg: DataConfig) -> dict[str, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    for split in SPLITS:
        cap = getattr(cfg, f"max_{split}_samples")
        df = frames[split]
        if cap is None or cap >= len(df):
            continue
        counts = df["label"].value_counts()
        strat = df["label"] if cap >= len(counts) and counts.min() >= 2 else None
        kept, _ = train_test_split(df, train_size=cap, random_state=cfg.seed, stratify=strat)
        frames[split] = kept.sort_values("example_id").reset_index(drop=True)
    return frames


def _content_fingerprint(frames: dict[str, pd.DataFrame], label_names: list[str], splits: tuple = SPLITS) -> str:
    h = hashlib.sha256()
    h.update(repr(label_names).encode())
    for split in splits:
        df = frames[split]
        h.update(split.encode())
        h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()[:20]
