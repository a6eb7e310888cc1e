"""Offline real English text for language-model runs, a fixed held-out split, and packing to fixed-length blocks.

Corpora (``data.task`` of ``model.arch=causal_lm``; nothing is ever downloaded, a missing corpus is one line):

- ``text``: ``data.text_files``, one document per non-empty line.
- ``wordnet``: the glosses of Princeton WordNet (Debian ``wordnet-base``, ``/usr/share/wordnet/data.*``): one
  definition with its quoted example sentences per synset, 117,659 documents, about 1.46M words.
- ``vader``: the four VADER corpora (movie reviews, tweets, NYT editorials, Amazon reviews; 23,703 sentences).
- ``wordnet+vader``: both (about 1.9M words).

The held-out split is a hash of each document's text (about 2 % of documents), so it is the same on every machine,
rank and run, and a document never sits on both sides. Packing concatenates the documents of a split (each followed by
the end-of-text token), in corpus order, and cuts ``length + 1``-token blocks: a block gives ``length`` inputs and
their ``length`` next tokens; attention runs across document boundaries inside a block (standard LM packing).
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import torch

from pad_moe.lm import CORPORA

WORDNET_DIR = os.environ.get("PAD_MOE_WORDNET_DIR", "/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
HELD_OUT_PER_MILLE = 20


def is_corpus(task: str) -> bool:
    return task in CORPORA


def held_out(text: str) -> bool:
    """True for about 2 % of documents, chosen by a hash of the text."""
    bucket = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") % 1000
    return bucket < HELD_OUT_PER_MILLE


def split_documents(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, held-out) in corpus order."""
    train, evaluation = [], []
    for text in texts:
        (evaluation if held_out(text) else train).append(text)
    return train, evaluation


def wordnet_glosses(folder: str = WORDNET_DIR) -> list[str]:
    """Every synset's gloss (definition and examples), in file order; one line naming the fix when not installed."""
    paths = [os.path.join(folder, name) for name in WORDNET_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"the WordNet corpus is not installed ({missing[0]} missing): apt-get install -y wordnet-base "
                         "(or set PAD_MOE_WORDNET_DIR), or pick data.task=text with data.text_files")
    out = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "| " not in line:  # the licence header; lines without a gloss
                    continue
                gloss = line.split("| ", 1)[1].strip()
                if gloss:
                    out.append(gloss)
    return out


def vader_sentences(cache_dir: str | None = None) -> list[str]:
    """The four VADER corpora's sentences (fetched once into pad_moe's cache by ``python -m pad_moe.data``)."""
    from pad_moe.data import vader

    if not vader.is_installed(cache_dir):
        raise ValueError("the VADER corpus is not installed: run `python -m pad_moe.data` (or bash tools/setup_env.sh), "
                         "or pick data.task=text with data.text_files")
    folder = os.path.join(vader.corpus_dir(cache_dir), vader.CORPUS_SUBDIR)
    return [row[-1] for name in vader.CORPUS_FILES
            for row in vader.read_ground_truth(os.path.join(folder, vader.CORPUS_FILES[name]))]


def read_text_files(paths: Sequence[str]) -> list[str]:
    """Non-empty lines of each file; one line for a missing, unreadable or empty input."""
    if not paths:
        raise ValueError("data.task=text needs data.text_files (one document per line)")
    texts = []
    for path in paths:
        if os.path.isdir(path):
            raise ValueError(f"text file {path!r} is a folder; list the text files in it (one document per line)")
        if not os.path.isfile(path):
            raise ValueError(f"text file {path!r} does not exist; pass existing files (one document per line)")
        try:
            with open(path, encoding="utf-8") as f:
                texts += [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as err:
            raise ValueError(f"text file {path!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not texts:
        raise ValueError(f"the text files {list(paths)} hold no non-empty line")
    return texts


def load_corpus(task: str, text_files: Sequence[str] = (), cache_dir: str | None = None) -> list[str]:
    """The documents of corpus ``task`` (one of ``CORPORA``)."""
    if task == "text":
        return read_text_files(text_files)
    if text_files:
        raise ValueError(f"data.text_files is set but data.task={task} reads its own corpus; use data.task=text or "
                         "drop data.text_files")
    if task == "wordnet":
        return wordnet_glosses()
    if task == "vader":
        return vader_sentences(cache_dir)
    if task == "wordnet+vader":
        return wordnet_glosses() + vader_sentences(cache_dir)
    raise ValueError(f"data.task={task!r} is not a text corpus; use one of {', '.join(CORPORA)}")


class PackedBlocks(torch.utils.data.Dataset):
    """``length + 1``-token blocks cut from the documents' token stream (each document + ``eos_id``); the tail
    shorter than a block is dropped. Item i: a LongTensor of length + 1."""

    def __init__(self, token_lists: Sequence[Sequence[int]], length: int, eos_id: int, max_blocks: int | None = None,
                 length_key: str = "data.max_length"):
        # length_key: the setting that sets ``length``, named in the errors (padmoe compress: --seq-len)
        if length < 2:
            raise ValueError(f"{length_key}={length}: packed language-model blocks need at least 2 tokens")
        stream = [t for ids in token_lists for t in (*ids, eos_id)]
        n = len(stream) // (length + 1)
        if max_blocks is not None:
            n = min(n, max_blocks)
        if n == 0:
            raise ValueError(f"the text holds {len(stream)} tokens, fewer than one block of {length + 1}; lower "
                             f"{length_key} or pass more text")
        self.blocks = torch.tensor(stream[:n * (length + 1)], dtype=torch.long).view(n, length + 1)
        self.length = length

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]

    @staticmethod
    def collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """input_ids (B, L) and labels (B, L): the next token of every input position."""
        blocks = torch.stack(items)
        return {"input_ids": blocks[:, :-1].contiguous(), "labels": blocks[:, 1:].contiguous()}
