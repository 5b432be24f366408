"""The teacher stage on Ray Train: cached by fingerprint, logits keyed by example_id."""

from __future__ import annotations

import pyarrow.parquet as pq

from kdray import metrics as M
from kdray.config import load_config
from kdray.data import load_data
from kdray.distill import TeacherLogits
from kdray.teacher import prepare_teacher


def test_teacher_is_cached_and_invalidated_by_data_or_teacher_changes(ray_cluster, tmp_path):
    base = ["data.max_train_samples=256", "data.max_validation_samples=64", "teacher.train.epochs=1",
            f"cache_dir={tmp_path / 'cache'}"]
    cfg = load_config("smoke", base)
    task = load_data(cfg.data)

    first = prepare_teacher(cfg, task, storage_path=tmp_path / "train", log=False)
    assert not first.cache_hit
    assert (first.model_dir / "model.safetensors").is_file() and (first.model_dir / "tokenizer.json").is_file()
    table = pq.read_table(first.logits_path)
    assert table.column_names == ["example_id", "split", "logits"]
    for split in ("train", "validation"):
        logits = TeacherLogits.from_parquet(first.logits_path, split)
        assert sorted(logits.example_ids.tolist()) == sorted(task.splits[split]["example_id"])
        assert logits.logits.shape == (len(task.splits[split]), 2)
    assert "test" not in set(table["split"].to_pylist())  # the test split is never touched here
    assert 0 <= first.record[M.VAL_ACCURACY] <= 1 and first.record["epochs"] == 1

    second = prepare_teacher(cfg, task, storage_path=tmp_path / "train", log=False)
    assert second.cache_hit and second.path == first.path and second.record == first.record

    other_data = load_config("smoke", base + ["data.max_train_samples=200"])
    third = prepare_teacher(other_data, load_data(other_data.data), storage_path=tmp_path / "train", log=False)
    assert not third.cache_hit and third.path != first.path

    taken_as_is = load_config("smoke", base + ["teacher.fine_tuned=true"])
    fourth = prepare_teacher(taken_as_is, task, storage_path=tmp_path / "train", log=False)
    assert not fourth.cache_hit and fourth.path not in (first.path, third.path)
    assert fourth.record["epochs"] == 0  # an already fine-tuned teacher is evaluated, not trained
