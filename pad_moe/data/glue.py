"""The 8 GLUE tasks and where their examples come from: the Hugging Face hub, or local csv/tsv/json/parquet files."""

from __future__ import annotations

import csv
import os

from datasets import Dataset, load_dataset

from pad_moe.data.task_info import TaskInfo

GLUE_HUB_ID = "nyu-mll/glue"
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("cola", ("sentence",), 2, "matthews", label_names=("unacceptable", "acceptable"),
             description="CoLA: grammatical acceptability (Matthews correlation)"),
    TaskInfo("sst2", ("sentence",), 2, "accuracy", label_names=("negative", "positive"),
             description="SST-2: movie-review sentence sentiment"),
    TaskInfo("mrpc", ("sentence1", "sentence2"), 2, "f1_accuracy", label_names=("not_equivalent", "equivalent"),
             column_aliases={"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
             description="MRPC: paraphrase (F1 and accuracy)"),
    TaskInfo("stsb", ("sentence1", "sentence2"), 1, "pearson_spearman", column_aliases={"score": "label"},
             description="STS-B: semantic similarity 0..5 (regression; Pearson and Spearman)"),
    TaskInfo("qqp", ("question1", "question2"), 2, "f1_accuracy", label_names=("not_duplicate", "duplicate"),
             column_aliases={"is_duplicate": "label"}, description="QQP: duplicate questions (F1 and accuracy)"),
    TaskInfo("mnli", ("premise", "hypothesis"), 3, "accuracy", eval_splits=("validation_matched",
             "validation_mismatched"), label_names=("entailment", "neutral", "contradiction"),
             column_aliases={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
             description="MNLI: 3-way entailment, matched and mismatched dev sets"),
    TaskInfo("qnli", ("question", "sentence"), 2, "accuracy", label_names=_NLI2,
             description="QNLI: does the sentence answer the question"),
    TaskInfo("rte", ("sentence1", "sentence2"), 2, "accuracy", label_names=_NLI2,
             description="RTE: 2-way entailment"),
)}

# file extension -> (datasets builder, options); compressed files (.gz, ...) are named by their inner extension.
# csv/tsv: text is literal ("NA", "null" stay strings); tsv: tab-separated without quoting, as GLUE's own files
_FORMATS = {
    ".csv": ("csv", {"keep_default_na": False}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def file_format(path: str) -> tuple[str, dict]:
    """(datasets builder, options) for a data file, chosen by its extension (``.tsv``: tab-separated, no quoting)."""
    stem = path
    for suffix in _COMPRESSION:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    ext = os.path.splitext(stem)[1].lower()
    if ext not in _FORMATS:
        raise ValueError(f"data file {path} has extension {ext or '(none)'!r}; allowed: {', '.join(_FORMATS)}")
    return _FORMATS[ext]


def read_data_files(info: TaskInfo, data_files: dict[str, str]) -> dict[str, Dataset]:
    """One Dataset per split from local files (``{"train": path, "validation": path, ...}``), columns as in the files.

    ``train`` and at least one of the task's eval splits are required; every path must exist.
    """
    if not isinstance(data_files, dict):
        raise ValueError(f"data_files must be a dict split -> path, got {type(data_files).__name__}")
    unknown = sorted(set(data_files) - set(info.splits))
    if unknown:
        raise ValueError(f"data_files for {info.name} has unknown split(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(info.splits)}")
    if "train" not in data_files or not set(info.eval_splits) & set(data_files):
        raise ValueError(f"data_files for {info.name} needs 'train' and at least one of {', '.join(info.eval_splits)}; "
                         f"got {', '.join(sorted(data_files)) or 'none'}")
    splits = {}
    for split, path in data_files.items():
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"data file for {info.name} split {split!r} not found: {path}")
        builder, options = file_format(path)
        try:
            splits[split] = load_dataset(builder, data_files={split: path}, split=split, **options)
        except Exception as error:  # noqa: BLE001 - any reader failure becomes one line naming the file
            raise ValueError(f"could not read {path} as {builder} ({_one_line(error)})") from error
    return splits


def data_files_hint(info: TaskInfo) -> str:
    """How to give a task's splits as local files, in config syntax."""
    splits = ", ".join(f"{s}: PATH" for s in ("train", *info.eval_splits))
    return f"data.data_files={{{splits}}} (csv, tsv, json(l) or parquet; load_task(..., data_files=...) in Python)"


def hub_offline() -> bool:
    """Whether ``datasets`` may not reach the hub (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE; ``padmoe`` sets them)."""
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def load_glue_hub(info: TaskInfo) -> dict[str, Dataset]:
    """The task's train and eval splits from the Hugging Face hub (or its local cache when offline).

    Offline with nothing cached, or the hub unreachable: one line naming ``data.data_files``.
    """
    try:
        loaded = load_dataset(GLUE_HUB_ID, info.name)
    except Exception as error:  # noqa: BLE001 - offline, no cache, hub down: one line saying what to do
        if hub_offline():
            raise ValueError(f"GLUE task {info.name} is not in the local Hugging Face datasets cache and the hub is "
                             f"off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): give the task's files with "
                             f"{data_files_hint(info)}") from None
        raise ValueError(f"GLUE task {info.name} could not be loaded from the hub {GLUE_HUB_ID} "
                         f"({_one_line(error)}); give local files with {data_files_hint(info)}") from error
    missing = [s for s in info.splits if s not in loaded]
    if missing:
        raise ValueError(f"hub dataset {GLUE_HUB_ID}/{info.name} lacks split(s) {', '.join(missing)}; "
                         f"found: {', '.join(loaded)}")
    return {s: loaded[s] for s in info.splits}
