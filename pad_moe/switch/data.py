"""T5-style span corruption over plain text, with a byte-level BPE vocabulary trained on the training split
(``tokenizers``, via ``pad_moe.lm.tokenizer``).

Texts: any text files (one document per non-empty line), else the VADER movie-review sentences installed by
``python -m pad_moe.data``; neither is one line (never a generated stand-in).

Span corruption (Raffel et al., 2020): about ``noise_density`` of a document's tokens, in spans of mean length
``mean_span``, are replaced in the input by sentinels ``<extra_id_i>``; the target lists each sentinel followed by the
tokens it hides, then ``</s>``. Corruption is drawn once per document from (seed, document index), so a run and its
resume see the same examples.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Iterable, Optional, Sequence

import torch

PAD, EOS, UNK = 0, 1, 2  # the ids of <pad>, </s>, <unk> in pad_moe.lm.tokenizer's BPE


class BpeVocab:
    """A byte-level BPE tokenizer (``train_bpe``) in a ``size``-id model vocabulary whose top ``num_sentinels`` ids
    are the sentinels (<extra_id_0> = size-1, as in T5). The BPE part may hold fewer ids than the room below the
    sentinels (a small corpus has fewer merges); the ids in between are never produced."""

    def __init__(self, tokenizer, size: int, num_sentinels: int):
        if len(tokenizer) > size - num_sentinels:
            raise ValueError(f"the tokenizer has {len(tokenizer)} ids, more than model.vocab_size={size} leaves next "
                             f"to {num_sentinels} sentinels")
        self.tokenizer, self.size, self.num_sentinels = tokenizer, size, num_sentinels

    @classmethod
    def build(cls, texts: Iterable[str], size: int, num_sentinels: int = 32) -> "BpeVocab":
        from pad_moe.lm.tokenizer import train_bpe

        return cls(train_bpe(list(texts), size - num_sentinels, exact=False), size, num_sentinels)

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel {i} >= num_sentinels={self.num_sentinels}")
        return self.size - 1 - i

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], []
        for i in map(int, ids):
            if i >= self.size - self.num_sentinels:
                out += [self.tokenizer.decode(run)] if run else []
                out.append(f"<extra_id_{self.size - 1 - i}>")
                run = []
            else:
                run.append(i)
        return "".join(out + ([self.tokenizer.decode(run)] if run else []))


def _segments(total: int, parts: int, g: torch.Generator) -> list[int]:
    """A uniformly random composition of ``total`` into ``parts`` positive lengths."""
    if parts == 1:
        return [total]
    cuts = (torch.randperm(total - 1, generator=g)[:parts - 1] + 1).sort().values.tolist()
    bounds = [0] + cuts + [total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def span_corrupt(tokens: Sequence[int], vocab: BpeVocab, g: torch.Generator, noise_density: float = 0.15,
                 mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of one document, both ending with </s>. Needs at least 2 tokens."""
    n = len(tokens)
    if n < 2:
        raise ValueError("span corruption needs documents of at least 2 tokens")
    num_noise = min(max(1, round(n * noise_density)), n - 1)
    num_spans = min(max(1, round(num_noise / mean_span)), num_noise, n - num_noise, vocab.num_sentinels)
    noise, keep = _segments(num_noise, num_spans, g), _segments(n - num_noise, num_spans, g)
    inputs, targets, pos = [], [], 0
    for i, (k, m) in enumerate(zip(keep, noise)):
        inputs += list(tokens[pos:pos + k]) + [vocab.sentinel(i)]
        targets += [vocab.sentinel(i)] + list(tokens[pos + k:pos + k + m])
        pos += k + m
    return inputs + [EOS], targets + [EOS]


def target_length(input_length: int, noise_density: float = 0.15) -> int:
    """The longest target span corruption makes from an input of ``input_length`` tokens (</s> included)."""
    n = input_length - 1
    noise = min(max(1, round(n * noise_density)), max(n - 1, 1))
    return 2 * noise + 1


class SpanCorruptionDataset(torch.utils.data.Dataset):
    """Fixed-shape examples: input (L_in), target (L_out); documents are truncated to L_in − 1 tokens."""

    def __init__(self, texts: Sequence[str], vocab: BpeVocab, input_length: int, seed: int = 0,
                 noise_density: float = 0.15, mean_span: float = 3.0):
        self.input_length = input_length
        self.target_length = target_length(input_length, noise_density)
        self.examples = []
        for i, text in enumerate(texts):
            ids = vocab.encode(text)[:input_length - 1]
            if len(ids) < 2:
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            self.examples.append(span_corrupt(ids, vocab, g, noise_density, mean_span))
        if not self.examples:
            raise ValueError("no document has 2 or more tokens; pass longer texts")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.examples[i]


def collate(items: list, input_length: int, target_length: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask (B, L_in); decoder_input_ids / decoder_attention_mask / labels (B, L_out), labels
    −100 on padding, decoder inputs = targets shifted right after the start token <pad>."""
    B = len(items)
    input_ids = torch.full((B, input_length), PAD, dtype=torch.long)
    labels = torch.full((B, target_length), -100, dtype=torch.long)
    dec_in = torch.full((B, target_length), PAD, dtype=torch.long)
    for b, (inp, tgt) in enumerate(items):
        input_ids[b, :len(inp)] = torch.tensor(inp)
        labels[b, :len(tgt)] = torch.tensor(tgt)
        dec_in[b, 1:len(tgt)] = torch.tensor(tgt[:-1])
    dec_mask = torch.zeros_like(dec_in)
    for b, (_, tgt) in enumerate(items):
        dec_mask[b, :len(tgt)] = 1
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long(), "decoder_input_ids": dec_in,
            "decoder_attention_mask": dec_mask, "labels": labels}


# -- texts --------------------------------------------------------------------------------------------------------------
def vader_texts(cache_dir: Optional[str] = None) -> Optional[list[str]]:
    """The VADER movie-review sentences when pad_moe.data.vader has them installed locally (never downloads)."""
    try:
        from pad_moe.data import vader
    except ImportError:
        return None
    try:
        if not vader.is_installed(cache_dir):
            return None
        folder = os.path.join(vader.corpus_dir(cache_dir), getattr(vader, "CORPUS_SUBDIR", ""))
        rows = vader.read_ground_truth(os.path.join(folder, vader.CORPUS_FILES["movies"]))
    except (AttributeError, OSError, ValueError):
        return None
    return [row[-1] for row in rows]


def split_texts(texts: Sequence[str], eval_per_mille: int = 100) -> tuple[list[str], list[str]]:
    """(train, eval) by a hash of the text, so duplicates stay on one side."""
    train, held = [], []
    for t in texts:
        h = int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "big")
        (held if h % 1000 < eval_per_mille else train).append(t)
    return train, held


def token_accuracy(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Target-token accuracy over non-padding positions (labels −100 are padding)."""
    keep = labels != -100
    total = int(keep.sum())
    acc = float((preds[keep] == labels[keep]).float().mean()) if total else math.nan
    return {"token_accuracy": acc}
