"""Causal language models: offline text corpora, tokenizers, packing and the ``model.arch=causal_lm`` job."""

CORPORA = ("text", "wordnet", "vader", "wordnet+vader")
"""``data.task`` values of ``model.arch=causal_lm`` (``pad_moe.lm.corpus``); kept here so configs import no torch."""
