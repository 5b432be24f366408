"""Metric names, defined once: flat, prefixed by split (DESIGN.md)."""

from __future__ import annotations

import numpy as np


TRAIN_LOSS = "train/loss"
TRAIN_CE = "train/ce_loss"
TRAIN_KD = "train/kd_loss"
VAL_LOSS = "val/loss"
VAL_ACCURACY = "val/accuracy"
VAL_F1 = "val/f1_macro"
TEST_ACCURACY = "test/accuracy"
TEST_F1 = "test/f1_macro"
TEST_PRECISION = "test/precision_macro"
TEST_RECALL = "test/recall_macro"
TRAINABLE_PARAMS = "trainable_params"
#: A student shape's batch-1 p50 latency in ms, measured before the search (`kdray.stages.shapes`).
LATENCY_MS = "latency_ms"
EPOCHS_DONE = "epochs_done"
"""Epochs finished: ASHA's time attribute (it survives a Tune-level restore, RAY_NOTES.md)."""
STATUS = "status"
"""`running` after an epoch with more to come, `completed`, or `diverged` (non-finite loss)."""
STATUS_RUNNING, STATUS_COMPLETED, STATUS_DIVERGED = "running", "completed", "diverged"
SAMPLES_PER_S = "train/samples_per_s"
EPOCH_SECONDS = "time/epoch_s"
"""Seconds of one epoch's training steps."""
EVAL_SECONDS = "time/eval_s"
"""Seconds of one epoch's validation pass."""
PLACEMENT = "placement"
"""Where a trial trained: JSON, one entry per rank (node id, the GPU ids Ray gave it, device)."""
GPU_BUSY = "gpu/busy_pct"
"""The trial's own GPU's mean utilisation over an epoch (NVML), on a CUDA device."""
GPU_BUSY_WHY = "gpu/busy_why"
"""Why a GPU trial has no utilisation figure (no NVML, a MIG slice)."""


def classification_metrics(confusion: np.ndarray, prefix: str) -> dict[str, float]:
    """Accuracy, macro-F1, macro precision and recall (scikit-learn) from a K x K confusion
    matrix (rows: true labels).

    Workers all-reduce confusion matrices, which is exact, then metrics come from the sum.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    k = confusion.shape[0]
    true, pred = np.nonzero(confusion)
    counts = confusion[true, pred].astype(np.int64)
    y_true, y_pred = np.repeat(true, counts), np.repeat(pred, counts)
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(k)),
                                                               average="macro", zero_division=0)
    return {
        f"{prefix}/accuracy": float(accuracy_score(y_true, y_pred)),
        f"{prefix}/f1_macro": float(f1),
        f"{prefix}/precision_macro": float(precision),
        f"{prefix}/recall_macro": float(recall),
    }
