"""GLUE tasks from local files, tokenisation with the real MiniLM tokenizer, dynamic padding, ordering, bad input."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import AutoTokenizer

from pad_moe.data import TASKS, load_task, make_dataloader, minilm_path, pad_collate, task_info
from pad_moe.data import glue as glue_module
from pad_moe.data.glue import read_data_files
from pad_moe.data.tasks import deterministic_subset

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def one_line_error(fn, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


SST2 = {"train": fixture("sst2_train.tsv"), "validation": fixture("sst2_dev.tsv")}


def test_registry_holds_the_8_glue_tasks():
    expected = {"cola": (("sentence",), 2), "sst2": (("sentence",), 2), "mrpc": (("sentence1", "sentence2"), 2),
                "stsb": (("sentence1", "sentence2"), 1), "qqp": (("question1", "question2"), 2),
                "mnli": (("premise", "hypothesis"), 3), "qnli": (("question", "sentence"), 2),
                "rte": (("sentence1", "sentence2"), 2)}
    for name, (columns, num_labels) in expected.items():
        info = task_info(name)
        assert (info.text_columns, info.num_labels, info.source) == (columns, num_labels, "glue")
    assert task_info("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert task_info("stsb").is_regression and not task_info("sst2").is_regression
    assert {"vader-movies", "vader-movies-reg"} <= set(TASKS)


def test_sst2_from_tsv_keeps_quotes_and_gives_torch_ready_examples(tokenizer):
    train, evals, info = load_task("sst2", tokenizer, data_files=SST2)
    assert (len(train), list(evals), len(evals["validation"])) == (6, ["validation"], 4)
    assert tokenizer.decode(evals["validation"][3]["input_ids"], skip_special_tokens=True) == "na"  # text, not missing
    item = train[1]
    assert set(item) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert item["labels"].dtype == torch.int64 and int(item["labels"]) == 0
    assert item["input_ids"][0] == tokenizer.cls_token_id and item["input_ids"][-1] == tokenizer.sep_token_id
    # tsv is read without quoting: a field that starts with a quote keeps it, and an unbalanced quote is text
    tokens = tokenizer.convert_ids_to_tokens(item["input_ids"])
    assert tokens[1:4] == ['"', "disaster", '"'] and tokens[-3:-1] == ['"', "finish"]
    assert info.name == "sst2"


def test_truncation_to_max_length_for_single_sentences_and_pairs(tokenizer):
    train, _, _ = load_task("sst2", tokenizer, data_files=SST2, max_length=6)
    assert max(len(train[i]["input_ids"]) for i in range(len(train))) == 6
    mrpc = {"train": fixture("mrpc_train.tsv"), "validation": fixture("mrpc_dev.tsv")}
    train, _, _ = load_task("mrpc", tokenizer, data_files=mrpc, max_length=16)
    item = train[0]
    assert len(item["input_ids"]) == 16 and int(item["token_type_ids"].sum()) > 0  # both sentences kept
    assert (item["input_ids"] == tokenizer.sep_token_id).sum() == 2


def test_original_glue_headers_are_recognised(tokenizer):
    # MRPC's own TSV: a byte-order mark and "Quality / #1 String / #2 String" instead of label / sentence1 / sentence2
    mrpc = {"train": fixture("mrpc_train.tsv"), "validation": fixture("mrpc_dev.tsv")}
    train, evals, _ = load_task("mrpc", tokenizer, data_files=mrpc)
    assert [int(train[i]["labels"]) for i in range(len(train))] == [1, 0, 1, 0]
    assert len(evals["validation"]) == 2


def test_stsb_labels_are_float(tokenizer):
    stsb = {"train": fixture("stsb_train.csv"), "validation": fixture("stsb_dev.csv")}
    train, evals, info = load_task("stsb", tokenizer, data_files=stsb)
    assert info.num_labels == 1
    assert train[1]["labels"].dtype == torch.float32 and float(train[1]["labels"]) == pytest.approx(3.8)
    assert float(evals["validation"][1]["labels"]) == 0.0


def test_mnli_string_labels_and_both_eval_sets(tokenizer):
    files = {"train": fixture("mnli_train.jsonl"), "validation_matched": fixture("mnli_dev_matched.jsonl"),
             "validation_mismatched": fixture("mnli_dev_mismatched.jsonl")}
    train, evals, _ = load_task("mnli", tokenizer, data_files=files)
    assert [int(train[i]["labels"]) for i in range(4)] == [1, 0, 0, 2]  # neutral, entailment x2, contradiction
    assert list(evals) == ["validation_matched", "validation_mismatched"]
    only_matched = {k: files[k] for k in ("train", "validation_matched")}
    assert list(load_task("mnli", tokenizer, data_files=only_matched)[1]) == ["validation_matched"]


def test_parquet_and_a_tokenizer_without_token_type_ids(tokenizer, tmp_path):
    import pandas as pd

    rows = {"question": ["What is the capital?", "Who wrote it?"], "sentence": ["Paris is.", "Nobody."],
            "label": ["entailment", "not_entailment"]}
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    files = {"train": str(tmp_path / "train.parquet"), "validation": str(tmp_path / "train.parquet")}
    no_types = copy.deepcopy(tokenizer)
    no_types.model_input_names = ["input_ids", "attention_mask"]
    train, _, _ = load_task("qnli", no_types, data_files=files)
    assert set(train[0]) == {"input_ids", "attention_mask", "labels"}
    assert set(train.collate([train[0], train[1]])) == {"input_ids", "attention_mask", "labels"}


def test_collate_pads_to_the_longest_in_the_batch():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 1]),
              "token_type_ids": torch.tensor([0, 0, 1]), "labels": torch.tensor(1)},
             {"input_ids": torch.tensor([5]), "attention_mask": torch.tensor([1]), "token_type_ids": torch.tensor([0]),
              "labels": torch.tensor(0)}]
    batch = pad_collate(items, pad_token_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["input_ids"].dtype == torch.int64
    floats = pad_collate([{"input_ids": torch.tensor([1]), "labels": torch.tensor(0.5)}] * 2, pad_token_id=0)
    assert floats["labels"].dtype == torch.float32


def test_dataloader_order_is_deterministic_per_seed_and_epoch_and_splits_across_ranks(tokenizer):
    train, _, _ = load_task("sst2", tokenizer, data_files=SST2)

    def order(seed, epoch, rank=0, world=1):
        return list(make_dataloader(train, 2, seed=seed, epoch=epoch, rank=rank, world_size=world).sampler)

    assert order(0, 0) == order(0, 0) and order(0, 0) != order(0, 1)
    ranks = [order(3, 1, r, 2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(6))
    batch = next(iter(make_dataloader(train, 4, seed=0, epoch=0)))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape == batch["attention_mask"].shape
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.max()) == batch["input_ids"].shape[1]  # padded to the batch's longest, not to max_length


def test_deterministic_subset_is_spread_and_stable():
    from datasets import Dataset

    ds = Dataset.from_dict({"x": list(range(1000))})
    a, b = deterministic_subset(ds, 100)["x"], deterministic_subset(ds, 100)["x"]
    assert list(a) == list(b) and list(a) == sorted(a) and len(a) == 100
    assert sum(v < 500 for v in a) in range(35, 66)  # not a prefix
    assert len(deterministic_subset(ds, 5000)) == 1000 and len(deterministic_subset(ds, None)) == 1000


def test_hub_layout_is_used_as_is(tokenizer, monkeypatch):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["unacceptable", "acceptable"]),
                         "idx": Value("int32")})

    def hub(path, name):
        assert (path, name) == ("nyu-mll/glue", "cola")

        def split(labels):
            n = len(labels)
            return Dataset.from_dict({"sentence": [f"s {i}" for i in range(n)], "label": labels,
                                      "idx": list(range(n))}, features=features)

        return DatasetDict({"train": split([0, 1, 1]), "validation": split([1, 0]), "test": split([-1, -1])})

    monkeypatch.setattr(glue_module, "load_dataset", hub)
    train, evals, info = load_task("cola", tokenizer)
    assert (len(train), list(evals), len(evals["validation"])) == (3, ["validation"], 2)  # unlabelled test ignored
    assert [int(train[i]["labels"]) for i in range(3)] == [0, 1, 1] and info.metric == "matthews"


def test_hub_failure_is_one_line_naming_data_files(tokenizer, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\n(offline mode is enabled)")

    monkeypatch.setattr(glue_module, "load_dataset", offline)
    message = one_line_error(lambda: load_task("mnli", tokenizer), "GLUE task mnli")
    assert "data.data_files={train: PATH, validation_matched: PATH, validation_mismatched: PATH}" in message


def test_bad_input_gives_one_line_errors(tokenizer, tmp_path):
    def sst2_with(split: str, name: str, text: str | None = None):
        if text is not None:
            (tmp_path / name).write_text(text)
        return lambda: load_task("sst2", tokenizer, data_files={**SST2, split: str(tmp_path / name)})

    one_line_error(lambda: load_task("sst3", tokenizer), r"unknown task 'sst3'; allowed: cola, sst2, mrpc, stsb")
    one_line_error(lambda: load_task("sst2", tokenizer, data_files=SST2, max_length=0), "max_length=0 must be a pos")
    one_line_error(lambda: load_task("sst2", tokenizer, data_files=SST2, max_train=0), "max_train=0 must be a pos")
    assert str(tmp_path / "nope.tsv") in one_line_error(sst2_with("train", "nope.tsv"), "not found")
    message = one_line_error(sst2_with("train", "bad.tsv", "text\tlabel\nfine\t1\n"), "column 'sentence' not found")
    assert "columns: text, label" in message
    one_line_error(sst2_with("train", "nolabel.tsv", "sentence\tgold\nfine\t1\n"),
                   r"column 'label' not found \(columns: sentence, gold\)")
    one_line_error(sst2_with("validation", "test.tsv", "sentence\tlabel\nno gold label\t-1\n"),
                   "label -1 is outside 0..1")
    one_line_error(sst2_with("train", "words.tsv", "sentence\tlabel\nhmm\tmaybe\n"),
                   "label 'maybe' is not one of negative, positive")
    one_line_error(sst2_with("train", "x.xlsx", ""), "extension '.xlsx'; allowed: .csv, .tsv")
    (tmp_path / "unscored.csv").write_text("sentence1,sentence2,label\na,b,\n")
    unscored = {"train": str(tmp_path / "unscored.csv"), "validation": str(tmp_path / "unscored.csv")}
    one_line_error(lambda: load_task("stsb", tokenizer, data_files=unscored), "'label' must hold numbers")
    one_line_error(lambda: read_data_files(task_info("sst2"), {"validation": SST2["validation"]}), "needs 'train'")
    one_line_error(lambda: read_data_files(task_info("sst2"), {**SST2, "test": SST2["train"]}),
                   "unknown split.* test; allowed: train, validation")
