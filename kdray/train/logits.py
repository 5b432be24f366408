"""The teacher's logits: a Parquet file keyed by `example_id`, and the table a trial looks
them up in."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass
class TeacherLogits:
    """The teacher's logits keyed by example_id (sorted, for binary-search look-up)."""

    example_ids: np.ndarray
    logits: np.ndarray
    """[N, K] float32."""

    def __post_init__(self) -> None:
        order = np.argsort(self.example_ids, kind="stable")
        self.example_ids = np.asarray(self.example_ids)[order]
        self.logits = np.asarray(self.logits, dtype=np.float32)[order]

    def lookup(self, example_ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.example_ids, example_ids)
        pos = np.minimum(pos, len(self.example_ids) - 1)
        missing = self.example_ids[pos] != example_ids
        if missing.any():
            raise KeyError(f"no teacher logits for example_id(s) {example_ids[missing][:5].tolist()}: "
                           f"the logits were computed on other data")
        return self.logits[pos]

    @classmethod
    def from_parquet(cls, *paths: str | os.PathLike | None, split: str | None = None) -> "TeacherLogits":
        """The logits in `write_logits` files (None entries skipped), of one split or all."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pa.concat_tables([pq.read_table(p) for p in paths if p is not None])
        if split is not None:
            table = table.filter(pc.equal(table["split"], split))
        logits = np.stack(table["logits"].to_numpy(zero_copy_only=False)).astype(np.float32)
        return cls(table["example_id"].to_numpy(), logits)


def write_logits(path: str | os.PathLike, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write `{split: (example_ids, logits [N, K])}` as Parquet: example_id, split, logits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, splits, rows = [], [], []
    for split, (eids, logits) in parts.items():
        ids.append(np.asarray(eids, dtype=np.int64))
        splits += [split] * len(eids)
        rows += [row.astype(np.float32) for row in logits]
    table = pa.table({"example_id": np.concatenate(ids), "split": splits,
                      "logits": pa.array(rows, type=pa.list_(pa.float32()))})
    pq.write_table(table, path)
