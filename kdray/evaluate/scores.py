"""Test scores from logits, their mean and spread over seeds, and what truncation cut."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdray import metrics as M


def split_scores(logits: np.ndarray, labels: np.ndarray, k: int) -> dict[str, Any]:
    pred = logits.argmax(-1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return {**M.classification_metrics(cm, "test"), "confusion": cm.tolist()}


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for a single seed) over seeds."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else None, "values": a.tolist()}


def truncation_stats(split: Any, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """How much of `split`'s texts `max_length` keeps (the tokenizer truncates the tail away)."""
    pair = "text_pair" in split.column_names
    enc = tokenizer(list(split["text"]), list(split["text_pair"]) if pair else None, truncation=False)
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    return {"max_length": max_length, "truncation": "head (the first max_length tokens are kept)",
            "truncated_share": float((lengths > max_length).mean()), "median_tokens": float(np.median(lengths))}
