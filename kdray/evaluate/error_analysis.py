"""The student's test mistakes in buckets: length, negation, and each true -> predicted pair."""

from __future__ import annotations

import re
from typing import Any

import numpy as np


NEGATION = re.compile(r"\b(?:not|no|never|nor|neither|nobody|nothing|none|nowhere|without|hardly|barely|cannot)\b"
                      r"|n't\b", re.IGNORECASE)


def error_analysis(texts: list[str], labels: np.ndarray, pred: np.ndarray, prob: np.ndarray,
                   teacher_pred: np.ndarray, label_names: list[str], per_bucket: int) -> dict[str, Any]:
    """The student's test mistakes in buckets: short and long texts (word-count quartiles),
    with and without negation, and each true -> predicted class pair. Each bucket gives its
    examples, the student's errors and error rate, the teacher's error rate on the same
    examples, and the student's most confident mistakes in it."""
    words = np.array([len(t.split()) for t in texts])
    short, long_ = int(np.percentile(words, 25)), int(np.percentile(words, 75))
    negated = np.array([bool(NEGATION.search(t)) for t in texts])
    wrong = pred != labels
    buckets = [(f"short (<= {short} words)", words <= short), (f"long (>= {long_} words)", words >= long_),
               ("contains negation", negated), ("no negation", ~negated)]
    rows = []
    for name, mask in buckets:
        rows.append(_bucket(name, mask, wrong, teacher_pred != labels, texts, labels, pred, prob, label_names,
                            per_bucket))
    for a, true_name in enumerate(label_names):
        for b, pred_name in enumerate(label_names):
            if a == b:
                continue
            mask = labels == a
            errors = mask & (pred == b)
            row = _bucket(f"{true_name} -> {pred_name}", mask, errors, mask & (teacher_pred == b), texts, labels,
                          pred, prob, label_names, per_bucket)
            rows.append(row)
    return {"test_examples": len(texts), "errors": int(wrong.sum()), "error_rate": float(wrong.mean()),
            "teacher_errors": int((teacher_pred != labels).sum()), "buckets": rows,
            "negation_pattern": NEGATION.pattern}


def _bucket(name: str, mask: np.ndarray, errors: np.ndarray, teacher_errors: np.ndarray, texts: list[str],
            labels: np.ndarray, pred: np.ndarray, prob: np.ndarray, label_names: list[str],
            per_bucket: int) -> dict[str, Any]:
    """A bucket's counts; rates are errors among the bucket's examples (for a class pair: among
    the examples of the true class)."""
    n = int(mask.sum())
    err = mask & errors
    idx = np.flatnonzero(err)
    idx = idx[np.argsort(-prob[idx], kind="stable")][:per_bucket]  # most confident mistakes first
    return {"bucket": name, "examples": n, "errors": int(err.sum()),
            "error_rate": float(err.sum() / n) if n else None,
            "teacher_error_rate": float((mask & teacher_errors).sum() / n) if n else None,
            "shown": [{"text": texts[i][:300], "label": label_names[labels[i]], "predicted": label_names[pred[i]],
                       "probability": float(prob[i])} for i in idx]}
