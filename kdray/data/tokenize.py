"""Tokenization of a task's splits, cached by (data, tokenizer, max_length)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kdray.cache import cache_root, cached_dir, fingerprint
from kdray.data.load import TaskData


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
