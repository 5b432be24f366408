"""Tokenized splits as plain arrays, length-grouped batches dealt to ranks, and a split held on
the device for a whole trial."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdray.train.logits import TeacherLogits


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


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
