"""The data layer: every source into one shape; deterministic, stratified, disjoint splits."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from kdray.config import DataConfig, ModelConfig
from kdray.data.load import SPLITS, TRANSFER_ID_BASE, UNLABELED, load_data
from kdray.data.read import from_hub_dataset, select_columns
from kdray.data.tokenize import tokenize
from kdray.errors import UserError
from kdray.train.models import load_tokenizer


def split_of(task, name: str):
    """A split of `task`, the sealed test split included (read as `tests`)."""
    return task.read_test("tests") if name == "test" else task.splits[name]


def check_shape(task, labels: list[str]):
    """The one shape every source loads into."""
    assert task.label_names == labels
    assert list(task.splits) == ["train", "validation"]  # the test split is sealed
    ids = []
    for split in SPLITS:
        ds = split_of(task, split)
        assert {"text", "label", "example_id"} <= set(ds.column_names)
        assert len(ds) > 0
        assert all(isinstance(t, str) and t.strip() for t in list(ds["text"]))
        assert set(list(ds["label"])) <= set(range(len(labels)))
        ids.append(set(list(ds["example_id"])))
    train, val, test = ids
    assert not (train & val) and not (train & test) and not (val & test)
    return task


def label_share(ds) -> pd.Series:
    return pd.Series(list(ds["label"])).value_counts(normalize=True).sort_index()


def test_embedded_rotten_tomatoes_sizes_and_stratification():
    task = check_shape(load_data(DataConfig(source="embedded:rotten_tomatoes")), ["negative", "positive"])
    assert [len(split_of(task, s)) for s in SPLITS] == [6824, 853, 853]
    for s in SPLITS:  # stratified: each split keeps the 50/50 balance to within one row
        assert abs(label_share(split_of(task, s))[0] - 0.5) <= 1 / len(split_of(task, s))


def test_embedded_imdb_sizes():
    task = check_shape(load_data(DataConfig(source="embedded:imdb")), ["negative", "positive"])
    assert [len(split_of(task, s)) for s in SPLITS] == [20000, 2500, 2500]


def test_splits_are_deterministic_for_a_seed_and_change_with_it():
    a = load_data(DataConfig(seed=1))
    b = load_data(DataConfig(seed=1))
    c = load_data(DataConfig(seed=2))
    assert a.fingerprint == b.fingerprint
    assert list(split_of(a, "test")["example_id"]) == list(split_of(b, "test")["example_id"])
    assert list(split_of(a, "test")["example_id"]) != list(split_of(c, "test")["example_id"])
    assert a.fingerprint != c.fingerprint


def test_subsampling_train_leaves_validation_and_test_alone():
    full = load_data(DataConfig())
    small = load_data(DataConfig(max_train_samples=100, max_validation_samples=50))
    assert len(small.splits["train"]) == 100 and len(small.splits["validation"]) == 50
    assert set(list(small.splits["train"]["example_id"])) <= set(list(full.splits["train"]["example_id"]))
    assert list(split_of(small, "test")["example_id"]) == list(split_of(full, "test")["example_id"])
    assert label_share(small.splits["train"]).tolist() == [0.5, 0.5]


def test_transfer_set_from_the_held_back_rows_is_unlabeled_capped_and_seeded():
    task = load_data(DataConfig(max_train_samples=500, unlabeled="rest", max_unlabeled_samples=1000))
    transfer = task.transfer.to_pandas()
    assert len(transfer) == 1000 and set(transfer["label"]) == {UNLABELED}  # the labels are never used
    ids = set(transfer["example_id"])
    assert ids <= set(task.rest["example_id"])  # the rows max_train_samples held back ...
    assert not ids & set(task.splits["train"]["example_id"])  # ... so none the students train on
    # None with a validation or test text either (a source may repeat a sentence).
    assert not set(transfer["text"].str.strip()) & {t.strip() for s in ("validation", "test")
                                                     for t in split_of(task, s)["text"]}
    assert load_data(DataConfig(max_train_samples=500, unlabeled="rest", max_unlabeled_samples=1000)
                     ).transfer_fingerprint == task.transfer_fingerprint
    assert task.fingerprint == load_data(DataConfig(max_train_samples=500)).fingerprint  # the labelled splits
    assert "transfer set 1,000 unlabeled rows (rest)" in task.description


def test_transfer_set_from_a_file_needs_no_labels_and_drops_validation_and_test_texts(tmp_path):
    cfg = DataConfig(source=write_csv(tmp_path, make_rows(60)))
    task = load_data(cfg)
    leaked = [split_of(task, "test")["text"][0], split_of(task, "validation")["text"][0]]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["raw text one", "raw text two", *leaked]))
    with_pool = load_data(DataConfig(source=cfg.source, unlabeled=str(pool)))
    transfer = with_pool.transfer.to_pandas()
    assert transfer["text"].tolist() == ["raw text one", "raw text two"]
    assert transfer["example_id"].min() >= TRANSFER_ID_BASE and set(transfer["label"]) == {UNLABELED}
    assert "2 dropped as validation or test texts" in with_pool.description
    # `rest` when max_train_samples holds nothing back (the default space on a small file): no
    # transfer set, and the data line says why.
    small = load_data(DataConfig(source=cfg.source, unlabeled="rest"))
    assert small.transfer is None and "no transfer set (data.unlabeled: rest" in small.description


#: Sentences in the Financial PhraseBank's own format (`sentence@label`, one per line), written
#: here rather than copied: the real files are CC BY-NC-SA, and kdray reads them from the hub
#: (`data.source: financial_phrasebank`) or from the user's own copy.
FPB_LINES = [(f"Operating profit rose to EUR {i}.{i % 10} mn from EUR {i % 7}.1 mn in the corresponding period", "positive")
             for i in range(12)] + [(f"Net sales fell by {i} % to EUR {i * 3} mn", "negative") for i in range(9)] \
    + [(f"The company is headquartered in Espoo , Finland , and has {i} employees", "neutral") for i in range(15)]


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_financial_phrasebank_original_format(tmp_path, encoding):
    """As Malo et al. ship it: Sentences_AllAgree.txt is utf-8, Sentences_50Agree.txt latin-1
    (a sentence with a byte above 127 must decode, not be mangled)."""
    lines = FPB_LINES + [("Nokia 's profit in Q3 grew 5 % to EUR 10 mn , said CEO Kallasvuo \u00e4", "positive")]
    f = tmp_path / ("Sentences_50Agree.txt" if encoding == "latin-1" else "Sentences_AllAgree.txt")
    f.write_bytes("".join(f"{t}@{label}\r\n" for t, label in lines).encode(encoding))
    task = check_shape(load_data(DataConfig(source=str(f))), ["negative", "neutral", "positive"])
    texts = [t for s in SPLITS for t in split_of(task, s)["text"]]
    assert len(texts) == len(lines)
    assert all("@" not in t for t in texts)
    assert any(t.endswith("Kallasvuo \u00e4") for t in texts)


def test_financial_phrasebank_hub_mapping():
    """`data.source: financial_phrasebank` (takala/financial_phrasebank, sentences_allagree): one
    train split with a `sentence` column and a 3-class ClassLabel; validation and test are carved."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    feats = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "neutral", "positive"])})
    names = ["negative", "neutral", "positive"]
    dd = DatasetDict(train=Dataset.from_dict({"sentence": [t for t, _ in FPB_LINES * 3],
                                              "label": [names.index(lab) for _, lab in FPB_LINES * 3]}, features=feats))
    cfg = DataConfig(source="financial_phrasebank")
    frames, where, label_names = from_hub_dataset(dd, cfg)
    assert label_names == names and set(frames) == {"train"}
    assert frames["train"].attrs["default_text_columns"] == ["sentence"]
    picked = select_columns(frames["train"], cfg, where["train"])
    assert list(picked["text"][:2]) == [t for t, _ in FPB_LINES[:2]]


def make_rows(n: int = 60, k: int = 2):
    return [{"text": f"example number {i} is {'good' if i % k == 0 else 'bad'}", "label": i % k} for i in range(n)]


def test_csv_with_header_and_string_labels(tmp_path):
    f = tmp_path / "reviews.csv"
    pd.DataFrame({"review": [r["text"] for r in make_rows()], "sentiment": ["pos", "neg"] * 30}).to_csv(f, index=False)
    task = load_data(DataConfig(source=str(f), text_columns=["review"], label_column="sentiment"))
    check_shape(task, ["neg", "pos"])
    assert [len(split_of(task, s)) for s in SPLITS] == [48, 6, 6]


def test_headerless_tsv_by_position_with_one_based_labels_and_joined_columns(tmp_path):
    """AG News as Kaggle ships it: class index 1-4, title, description."""
    f = tmp_path / "ag.tsv"
    rows = [(i % 4 + 1, f"title {i}", f"description of item {i}") for i in range(80)]
    f.write_text("\n".join("\t".join(map(str, r)) for r in rows) + "\n", encoding="utf-8")
    names = ["World", "Sports", "Business", "Sci/Tech"]
    task = check_shape(load_data(DataConfig(source=str(f), header=False, text_columns=[1, 2], label_column=0,
                                            label_names=names)), names)
    row = next(r for s in SPLITS for r in split_of(task, s) if r["example_id"] == 5)
    assert row["text"] == "title 5 description of item 5" and row["label"] == 1  # class index 2 -> id 1


def test_jsonl_json_and_parquet_load_into_the_same_shape(tmp_path):
    rows = make_rows()
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    tasks = [load_data(DataConfig(source=str(tmp_path / f"d.{ext}"))) for ext in ("jsonl", "json", "parquet")]
    for t in tasks:
        check_shape(t, ["0", "1"])
    assert tasks[0].fingerprint == tasks[1].fingerprint == tasks[2].fingerprint


def test_one_file_per_split_keeps_them_and_gives_stable_ids(tmp_path):
    rows = make_rows(90)
    for name, part in (("train", rows[:60]), ("validation", rows[60:75]), ("test", rows[75:])):
        pd.DataFrame(part).to_csv(tmp_path / f"{name}.csv", index=False)
    task = load_data(DataConfig(source=None, train_file=str(tmp_path / "train.csv"),
                                validation_file=str(tmp_path / "validation.csv"), test_file=str(tmp_path / "test.csv")))
    check_shape(task, ["0", "1"])
    assert list(task.splits["validation"]["example_id"]) == list(range(60, 75))
    assert list(split_of(task, "test")["text"]) == [r["text"] for r in rows[75:]]


def test_text_pair_column(tmp_path):
    f = tmp_path / "pairs.csv"
    pd.DataFrame({"premise": [f"p {i}" for i in range(40)], "hypothesis": [f"h {i}" for i in range(40)],
                  "label": [i % 2 for i in range(40)]}).to_csv(f, index=False)
    task = load_data(DataConfig(source=str(f), text_columns=["premise"], text_pair_column="hypothesis"))
    assert "text_pair" in task.splits["train"].column_names


# ----------------------------------------------------------------------------- hub-shaped data


def glue_sst2_like():
    """A DatasetDict shaped like `load_dataset("nyu-mll/glue", "sst2")`: test labels hidden (-1)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    feats = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"]), "idx": Value("int32")})

    def split(n, hidden=False):
        return Dataset.from_dict({"sentence": [f"sentence {i} here" for i in range(n)],
                                  "label": [-1 if hidden else i % 2 for i in range(n)], "idx": list(range(n))}, features=feats)

    return DatasetDict(train=split(80), validation=split(20), test=split(30, hidden=True))


def test_glue_mapping_uses_validation_as_test_and_carves_validation():
    frames, where, names = from_hub_dataset(glue_sst2_like(), DataConfig(source="glue/sst2"))
    assert names == ["negative", "positive"]
    assert set(frames) == {"train", "test"}  # validation became test; hidden-label test dropped
    assert len(frames["test"]) == 20 and "[validation]" in where["test"]


def test_hub_layout_directory_loads_through_datasets(tmp_path):
    """The real `datasets.load_dataset` path, on a local directory in the hub's parquet layout."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    feats = Features({"text": Value("string"), "label": ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])})
    dd = DatasetDict(train=Dataset.from_dict({"text": [f"news {i}" for i in range(120)], "label": [i % 4 for i in range(120)]}, features=feats),
                     test=Dataset.from_dict({"text": [f"story {i}" for i in range(40)], "label": [i % 4 for i in range(40)]}, features=feats))
    (tmp_path / "data").mkdir()
    for s in dd:
        dd[s].to_parquet(str(tmp_path / "data" / f"{s}-00000-of-00001.parquet"))
    task = check_shape(load_data(DataConfig(source=str(tmp_path))), ["World", "Sports", "Business", "Sci/Tech"])
    assert len(split_of(task, "test")) == 40  # kept; validation carved from train
    assert len(task.splits["validation"]) == 12 and len(task.splits["train"]) == 108  # 10 % of train


# ----------------------------------------------------------------------------- bad input


def write_csv(tmp_path, rows, name="d.csv") -> str:
    f = tmp_path / name
    pd.DataFrame(rows).to_csv(f, index=False)
    return str(f)


@pytest.mark.parametrize("case, needles", [
    ("missing_file", ["no such file", "data.source"]),
    ("unknown_column", ["'body' is not a column", "columns: text, label", "data.text_columns"]),
    ("label_outside_set", ["label value(s) maybe", "data.label_names", "Fix"]),
    ("int_label_outside_set", ["label value(s) 7", "outside the label set"]),
    ("empty_text", ["empty text", "row(s) 3", "Fix"]),
    ("undecodable", ["byte 0xff on line 3", "not valid utf-8", "data.encoding"]),
    ("single_class", ["same label", "two classes"]),
    ("too_few_rows", ["too few", "one row of each class"]),
])
def test_bad_input_is_one_clear_error(tmp_path, case, needles):
    rows = make_rows(40)
    cfg = DataConfig(source=write_csv(tmp_path, rows))
    if case == "missing_file":
        cfg = DataConfig(source=str(tmp_path / "nope.csv"))
    elif case == "unknown_column":
        cfg.text_columns = ["body"]
    elif case == "label_outside_set":
        rows = [dict(r, label=["good", "bad"][r["label"]]) for r in rows]
        rows[7]["label"] = "maybe"
        cfg = DataConfig(source=write_csv(tmp_path, rows), label_names=["good", "bad"])
    elif case == "int_label_outside_set":
        rows[3]["label"] = 7
        cfg = DataConfig(source=write_csv(tmp_path, rows), label_names=["neg", "pos"])
    elif case == "empty_text":
        rows[2]["text"] = "   "
        cfg = DataConfig(source=write_csv(tmp_path, rows))
    elif case == "undecodable":
        f = tmp_path / "bad.csv"
        f.write_bytes(b"text,label\nfine,0\nbroken \xff here,1\n")
        cfg = DataConfig(source=str(f))
    elif case == "single_class":
        cfg = DataConfig(source=write_csv(tmp_path, [dict(r, label=0) for r in rows]))
    elif case == "too_few_rows":
        cfg = DataConfig(source=write_csv(tmp_path, rows[:5]))
    with pytest.raises(UserError) as e:
        load_data(cfg)
    msg = e.value.message()
    for needle in needles:
        assert needle in msg, msg
    assert msg.count("\n") == 0  # one problem, one line


# ----------------------------------------------------------------------------- tokenization cache


def test_tokenization_is_cached_per_tokenizer_length_and_data():
    task = load_data(DataConfig(max_train_samples=64, max_validation_samples=16, max_test_samples=16))
    tok = load_tokenizer(ModelConfig(name="embedded:minilm-l6"))
    first, hit1 = tokenize(task, tok, 32)
    second, hit2 = tokenize(task, tok, 32)
    other, hit3 = tokenize(task, tok, 16)
    assert (hit1, hit2, hit3) == (False, True, False)
    assert list(first["train"]["input_ids"]) == list(second["train"]["input_ids"])
    assert max(list(other["train"]["length"])) <= 16 < max(list(first["train"]["length"])) + 1
    assert set(first["train"].column_names) >= {"input_ids", "attention_mask", "label", "example_id", "length"}
    assert len({len(x) for x in list(first["train"]["input_ids"])}) > 1  # no padding at this stage
