"""The task registry (GLUE + VADER), tokenisation, and batching with dynamic padding.

    train, evals, info = load_task("vader-movies", tokenizer, max_train=2000)
    batch = train.collate([train[i] for i in range(8)])   # input_ids, attention_mask, [token_type_ids], labels
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from functools import partial

import datasets
import torch
from datasets import Dataset, Value
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, DistributedSampler

from pad_moe.data.glue import GLUE_TASKS, load_glue_hub, read_data_files
from pad_moe.data.task_info import TaskInfo
from pad_moe.data.vader import VADER_TASKS, load_vader_splits

TASKS: dict[str, TaskInfo] = {**GLUE_TASKS, **VADER_TASKS}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SUBSET_SALT = "pad_moe-subset"


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def task_info(name: str) -> TaskInfo:
    """The registry entry of ``name``; a ValueError naming the allowed tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def deterministic_subset(dataset: Dataset, n: int | None, salt: str = SUBSET_SALT) -> Dataset:
    """``n`` rows chosen by a hash of (salt, row index), in their original order; all rows when n is None or larger.

    Independent of library versions and random state, and spread over the whole file (the VADER movie file is sorted
    by sign: a prefix would be almost all positive).
    """
    if n is None or n >= len(dataset):
        return dataset
    keys = [hashlib.blake2b(f"{salt}:{i}".encode(), digest_size=8).digest() for i in range(len(dataset))]
    chosen = sorted(sorted(range(len(dataset)), key=keys.__getitem__)[:n])
    return dataset.select(chosen)


def prepare_columns(dataset: Dataset, info: TaskInfo, where: str) -> Dataset:
    """The task's text columns and integer (or float) labels, checked; ``where`` names the data in errors."""
    renames = {c: c.lstrip("\ufeff").strip() for c in dataset.column_names if c != c.lstrip("\ufeff").strip()}
    dataset = dataset.rename_columns(renames) if renames else dataset
    for alias, canonical in info.column_aliases.items():
        if canonical not in dataset.column_names and alias in dataset.column_names:
            dataset = dataset.rename_column(alias, canonical)
    for column in (*info.text_columns, info.label_column):
        if column not in dataset.column_names:
            raise ValueError(f"{where}: column {column!r} not found (columns: {', '.join(dataset.column_names)}); "
                             f"{info.name} needs {', '.join((*info.text_columns, info.label_column))}")
    dataset = dataset.select_columns([*info.text_columns, info.label_column])
    labels = list(dataset[info.label_column])
    if any(v is None for v in labels):
        raise ValueError(f"{where}: {sum(v is None for v in labels)} rows have no {info.label_column!r}")
    if info.is_regression:
        try:
            values = [float(v) for v in labels]
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {info.label_column!r} must hold numbers for regression ({error})") from None
        if any(math.isnan(v) for v in values):
            raise ValueError(f"{where}: {sum(math.isnan(v) for v in values)} rows have no {info.label_column!r}")
    else:
        values = [_class_id(v, info, where) for v in labels]
    dataset = dataset.remove_columns(info.label_column).add_column(info.label_column, values)
    return dataset.cast_column(info.label_column, Value("float32" if info.is_regression else "int64"))


def _class_id(value, info: TaskInfo, where: str) -> int:
    if isinstance(value, str):
        text = value.strip()
        if text in info.label_names:
            return info.label_names.index(text)
        if not text.lstrip("-").isdigit():
            raise ValueError(f"{where}: label {value!r} is not one of {', '.join(info.label_names) or 'the class ids'}")
        value = int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < info.num_labels:
        raise ValueError(f"{where}: label {value!r} is outside 0..{info.num_labels - 1} (a test split without labels "
                         f"has -1: evaluate on a labelled split)")
    return value


@contextlib.contextmanager
def _quiet_progress():
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def tokenize_dataset(dataset: Dataset, info: TaskInfo, tokenizer, max_length: int = 128) -> Dataset:
    """input_ids, attention_mask, token_type_ids (when the tokenizer makes them) and labels; truncated, unpadded."""
    _positive_int("max_length", max_length)

    def encode(batch: dict) -> dict:
        texts = [["" if t is None else str(t) for t in batch[c]] for c in info.text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        out = {k: encoded[k] for k in MODEL_INPUTS if k in encoded}
        out["labels"] = batch[info.label_column]
        return out

    tag = f"{dataset._fingerprint}|{info.name}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|{max_length}"
    return dataset.map(encode, batched=True, batch_size=1000, remove_columns=dataset.column_names,
                       keep_in_memory=True, new_fingerprint=hashlib.sha1(tag.encode()).hexdigest()[:16])


def pad_collate(items: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into a batch, padding each sequence field to the batch's longest (input_ids with the pad id,
    attention_mask and token_type_ids with 0); labels are stacked as they are (int64 or float32)."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "labels":
            batch[key] = torch.stack([torch.as_tensor(v) for v in values])
        else:
            batch[key] = pad_sequence([torch.as_tensor(v, dtype=torch.long) for v in values], batch_first=True,
                                      padding_value=pad_token_id if key == "input_ids" else 0)
    return batch


class TokenizedDataset(torch.utils.data.Dataset):
    """A tokenised split: item i is a dict of 1-D tensors (and a 0-d ``labels``); ``collate`` pads a list of them."""

    def __init__(self, table: Dataset, pad_token_id: int, task: TaskInfo):
        self.table = table.with_format("torch")
        self.pad_token_id = pad_token_id
        self.task = task

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.table[int(index)]

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return pad_collate(items, self.pad_token_id)

    @property
    def collate_fn(self):
        """A picklable collate function (for DataLoader workers)."""
        return partial(pad_collate, pad_token_id=self.pad_token_id)


def load_raw_splits(info: TaskInfo, data_files: dict | None = None, cache_dir=None) -> dict[str, Dataset]:
    """Untokenised train + eval splits: local files when given, else the hub (GLUE) or the VADER cache."""
    if data_files is not None:
        return read_data_files(info, data_files)
    if info.source == "vader":
        return load_vader_splits(info, cache_dir)
    return load_glue_hub(info)


def load_task(name: str, tokenizer, *, max_length: int = 128, data_files: dict | None = None,
              cache_dir: str | os.PathLike | None = None, max_train: int | None = None,
              max_eval: int | None = None) -> tuple[TokenizedDataset, dict[str, TokenizedDataset], TaskInfo]:
    """(train set, {eval split: set}, task info) of a registered task, tokenised with ``tokenizer``.

    data_files: ``{split: path}`` (csv, tsv, json, jsonl, parquet) instead of the hub / VADER cache.
    cache_dir: pad_moe's cache root for the VADER corpus.
    max_train / max_eval: deterministic subsets for quick runs (max_eval applies to each eval split).
    """
    info = task_info(name)
    _positive_int("max_length", max_length)
    _positive_int("max_train", max_train, allow_none=True)
    _positive_int("max_eval", max_eval, allow_none=True)
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no pad token; set one")
    sets = {}
    with _quiet_progress():
        for split, dataset in load_raw_splits(info, data_files, cache_dir).items():
            where = f"{name} {split} ({data_files[split]})" if data_files else f"{name} {split}"
            dataset = prepare_columns(dataset, info, where)
            dataset = deterministic_subset(dataset, max_train if split == "train" else max_eval)
            tokenized = tokenize_dataset(dataset, info, tokenizer, max_length)
            sets[split] = TokenizedDataset(tokenized, tokenizer.pad_token_id, info)
    return sets["train"], {s: sets[s] for s in info.eval_splits if s in sets}, info


def make_dataloader(dataset: TokenizedDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                    rank: int = 0, world_size: int = 1, drop_last: bool = False) -> DataLoader:
    """A DataLoader over this rank's share, in the order DistributedSampler gives for (seed, epoch), padded per batch.

    Call ``loader.sampler.set_epoch(e)`` for a later epoch; needs no process group (rank and world_size are given).
    """
    _positive_int("batch_size", batch_size)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=dataset.collate_fn,
                      drop_last=drop_last)
