"""Tokenizers for language-model runs: the model's own (a local Hugging Face folder), or a byte-level BPE trained on
the run's training documents with the ``tokenizers`` library.

Training is deterministic (same documents and size: the same vocabulary, checked in tests), so every rank trains its
own copy instead of waiting for one on disk; the run saves it beside its model. Ids 0, 1, 2 are ``<pad>``, ``</s>``
(end of text, also the separator between packed documents) and ``<unk>``; byte-level BPE never needs ``<unk>``.
Span corruption adds ``num_sentinels`` ``<extra_id_i>`` tokens, T5's convention, at the top of the vocabulary.
"""

from __future__ import annotations

from typing import Sequence

SPECIALS = ("<pad>", "</s>", "<unk>")
MIN_VOCAB = 300  # the 256 byte symbols, the specials and a few merges


def train_bpe(texts: Sequence[str], vocab_size: int, num_sentinels: int = 0, exact: bool = True):
    """A ``PreTrainedTokenizerFast`` of ``vocab_size`` ids, the sentinels last. A text with too few distinct pairs
    for that many merges is one line when ``exact``, else gives a smaller vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB + num_sentinels:
        raise ValueError(f"model.vocab_size={vocab_size} is too small for a byte-level BPE tokenizer (at least "
                         f"{MIN_VOCAB + num_sentinels}); raise model.vocab_size")
    if not texts:
        raise ValueError("no training text to build the tokenizer from")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - num_sentinels, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    sentinels = [f"<extra_id_{i}>" for i in range(num_sentinels)][::-1]  # <extra_id_0> = the last id, as in T5
    if sentinels:
        tok.add_special_tokens(sentinels)
    if exact and tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the training text yields only {tok.get_vocab_size()} BPE ids, not model.vocab_size="
                         f"{vocab_size}; lower model.vocab_size or pass more text")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=sentinels or None)
    return fast


def model_tokenizer(path: str, fix: str = "use data.tokenizer=bpe to train one on the corpus"):
    """The tokenizer saved with the model at ``path``; one line when the folder has none (ending in ``fix``) or it has
    no eos token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any failure: one line naming the folder
        raise ValueError(f"{path} has no readable tokenizer ({type(err).__name__}); {fix}") from None
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer of {path} has no end-of-text (eos) token to separate packed documents")
    return tok


def encode_all(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of every document (no special tokens added; packing adds the separator)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
