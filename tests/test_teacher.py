"""The teacher stage on Ray Train: cached by fingerprint, logits keyed by example_id."""

from __future__ import annotations

import pyarrow.parquet as pq

from kdray import metrics as M
from kdray.config import load_config
from kdray.data.load import load_data
from kdray.stages.teacher import prepare_teacher
from kdray.train.logits import TeacherLogits


def test_teacher_is_cached_and_invalidated_by_data_or_teacher_changes(ray_cluster, tmp_path, capsys):
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
        logits = TeacherLogits.from_parquet(first.logits_path, split=split)
        assert sorted(logits.example_ids.tolist()) == sorted(task.splits[split]["example_id"])
        assert logits.logits.shape == (len(task.splits[split]), 2)
    assert "test" not in set(table["split"].to_pylist())  # the test split is never touched here
    assert 0 <= first.record[M.VAL_ACCURACY] <= 1 and first.record["epochs"] == 1

    second = prepare_teacher(cfg, task, storage_path=tmp_path / "train", log=False)
    assert second.cache_hit and second.path == first.path and second.record == first.record

    # a damaged entry (a file cut short, as by a full disk or a half copy) is said so and rebuilt
    with open(second.logits_path, "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    rebuilt = prepare_teacher(cfg, task, storage_path=tmp_path / "train", log=False)
    assert "is damaged (logits.parquet has 100 bytes" in capsys.readouterr().out
    assert not rebuilt.cache_hit and rebuilt.path == first.path
    assert pq.read_table(rebuilt.logits_path).num_rows == table.num_rows

    other_data = load_config("smoke", base + ["data.max_train_samples=200"])
    third = prepare_teacher(other_data, load_data(other_data.data), storage_path=tmp_path / "train", log=False)
    assert not third.cache_hit and third.path != first.path

    taken_as_is = load_config("smoke", base + ["teacher.fine_tuned=true"])
    fourth = prepare_teacher(taken_as_is, task, storage_path=tmp_path / "train", log=False)
    assert not fourth.cache_hit and fourth.path not in (first.path, third.path)
    assert fourth.record["epochs"] == 0  # an already fine-tuned teacher is evaluated, not trained


def test_lora_teacher_is_saved_merged_and_reloads_with_the_same_logits(ray_cluster, tmp_path):
    """Seed 004's LoRA teacher: the stage merges the trained adapters (`kdray.train.models.merged`)
    before it computes the logits and saves a plain HF model, so the saved model reproduces them."""
    import numpy as np
    import torch

    from kdray.data.tokenize import tokenize
    from kdray.train.batches import Split
    from kdray.train.loop import predict_logits
    from kdray.train.models import from_pretrained_dir, load_tokenizer

    cfg = load_config("smoke", ["teacher.mode=lora", "teacher.lora.r=4", "teacher.train.epochs=1",
                                "teacher.train.precision=fp32", "data.max_train_samples=128",
                                "data.max_validation_samples=32", f"cache_dir={tmp_path / 'cache'}"])
    task = load_data(cfg.data)
    teacher = prepare_teacher(cfg, task, storage_path=tmp_path / "train", log=False)
    assert not (teacher.model_dir / "adapter_config.json").exists()
    reloaded = from_pretrained_dir(teacher.model_dir)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    stored = TeacherLogits.from_parquet(teacher.logits_path, split="validation")
    tokenizer = load_tokenizer(cfg.teacher)
    tokenized, _ = tokenize(task, tokenizer, cfg.data.max_length, cfg.cache_dir)
    split = Split.from_dataset(tokenized["validation"])
    again = predict_logits(reloaded, split, 16, tokenizer.pad_token_id, torch.device("cpu"),
                           precision="fp32")
    order = np.argsort(stored.example_ids)
    assert np.allclose(again[np.argsort(split.example_ids)], stored.logits[order], atol=1e-5)


def test_a_teacher_on_all_training_data_also_trains_on_the_rows_the_students_never_see(ray_cluster, tmp_path):
    from kdray.stages.teacher import teacher_fingerprint
    from kdray.train.models import load_tokenizer

    # fp32: the file's logits below must equal the teacher's own to 1e-4, and under bf16 a row's
    # logits move by bf16's rounding (~1e-2) with the padding width of the batch it falls in.
    base = ["data.max_train_samples=256", "data.max_validation_samples=64", "teacher.train.epochs=1",
            "teacher.train.precision=fp32", f"cache_dir={tmp_path / 'cache'}"]
    cfg = load_config("smoke", base + ["teacher.all_train_data=true"])
    task = load_data(cfg.data)
    train_ids = set(task.splits["train"]["example_id"])
    rest_ids = set(task.rest["example_id"])
    # The held-back rows: every training row the cap left out, none of validation's or test's.
    assert len(train_ids) == 256 and len(rest_ids) > 1000 and not train_ids & rest_ids
    assert not rest_ids & set(task.splits["validation"]["example_id"])
    capped = load_config("smoke", base)
    tok = load_tokenizer(cfg.teacher)
    assert teacher_fingerprint(cfg, task, tok) != teacher_fingerprint(capped, task, tok)

    teacher = prepare_teacher(cfg, task, storage_path=tmp_path / "train", log=False)
    assert teacher.record["train_examples"] == len(train_ids) + len(rest_ids)
    logits = TeacherLogits.from_parquet(teacher.logits_path, split="train")
    assert set(logits.example_ids.tolist()) == train_ids | rest_ids  # the students' rows are all there
    # Without held-back rows the flag changes nothing, so the key is the plain teacher's.
    whole = load_config("smoke", ["data.max_train_samples=null", "teacher.all_train_data=true"])
    plain = load_config("smoke", ["data.max_train_samples=null"])
    whole_task = load_data(whole.data)
    assert whole_task.rest is None
    assert teacher_fingerprint(whole, whole_task, tok) == teacher_fingerprint(plain, whole_task, tok)

    # A transfer set never retrains the teacher. `rest` is covered by its own logits; a file is
    # labelled once, by the same weights: its rows (here the held-back texts) get the same logits.
    covered = load_config("smoke", base + ["teacher.all_train_data=true", "data.unlabeled=rest"])
    covered_task = load_data(covered.data)
    again = prepare_teacher(covered, covered_task, storage_path=tmp_path / "train", log=False)
    assert again.cache_hit and again.path == teacher.path and again.transfer_logits_path is None
    texts = covered_task.transfer.to_pandas()
    pool = tmp_path / "pool.csv"
    texts[["text"]].to_csv(pool, index=False)
    from_file = load_config("smoke", base + ["teacher.all_train_data=true", f"data.unlabeled={pool}"])
    file_task = load_data(from_file.data)
    labelled = prepare_teacher(from_file, file_task, storage_path=tmp_path / "train", log=False)
    assert labelled.cache_hit and labelled.transfer_logits_path is not None
    by_file = TeacherLogits.from_parquet(labelled.transfer_logits_path, split="transfer")
    assert sorted(by_file.example_ids.tolist()) == sorted(file_task.transfer["example_id"])
    by_row = dict(zip(file_task.transfer["example_id"], texts["example_id"]))  # file row -> held-back row
    import numpy as np

    own = logits.lookup(np.array([by_row[i] for i in by_file.example_ids]))
    assert np.allclose(by_file.logits, own, atol=1e-4)
    cached = prepare_teacher(from_file, file_task, storage_path=tmp_path / "train", log=False)
    assert cached.transfer_logits_path == labelled.transfer_logits_path
