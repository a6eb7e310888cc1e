"""The Hugging Face encoders of the paper's Table 1/3, with their published hyper-parameters, built locally.

No download: each preset is a ``transformers`` config class filled with the values of the published checkpoint's
config (bert-base-uncased, roberta-base, albert-base-v2, google/electra-base-discriminator). ``build_encoder`` builds
the bare encoder (no pooler, no task head: the paper's counting convention) on the meta device by default.

``MODEL_PRESET_ENTRIES`` is the same data in the layout of ``pad_moe.presets.MODEL_PRESETS`` (ModelConfig fields), for
the presets registry; training from these presets still needs the pretrained weights (``model.path``), whose
config.json must agree with the preset's sizes. Like every upcycled model they route dropless (``moe.drop_tokens``
unset), so the upcycled model starts as its dense original; capacity dispatch is ``moe.drop_tokens=true``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

HF_PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": {
        "model_type": "bert", "published": "bert-base-uncased",
        "config": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                   "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
                   "layer_norm_eps": 1e-12, "pad_token_id": 0},
    },
    "roberta-base": {
        "model_type": "roberta", "published": "roberta-base",
        "config": {"vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                   "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 514, "type_vocab_size": 1,
                   "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    },
    "albert-base": {
        "model_type": "albert", "published": "albert-base-v2",
        "config": {"vocab_size": 30000, "embedding_size": 128, "hidden_size": 768, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu_new",
                   "num_hidden_groups": 1, "inner_group_num": 1, "hidden_dropout_prob": 0.0,
                   "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 512, "type_vocab_size": 2,
                   "layer_norm_eps": 1e-12, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3},
    },
    "electra-base": {
        "model_type": "electra", "published": "google/electra-base-discriminator",
        "config": {"vocab_size": 30522, "embedding_size": 768, "hidden_size": 768, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                   "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
                   "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0},
    },
}

PAPER_QUIRKS: dict[str, dict[str, str]] = {
    # Table 3 prints ALBERT's PAD row (30.0M at κ=0.5) with the static FFN counted whole, (1 + 8κ)·FFN, while the
    # BERT / RoBERTa / ELECTRA rows count it masked, (1 − κ + 8κ)·FFN (see ../shared/notes/paper-facts.md).
    "albert-base": {"pad_static": "whole"},
}

_CLASSES = {"bert": ("BertConfig", "BertModel"), "roberta": ("RobertaConfig", "RobertaModel"),
            "albert": ("AlbertConfig", "AlbertModel"), "electra": ("ElectraConfig", "ElectraModel")}


def hf_config(name: str):
    """The transformers config object of preset ``name``."""
    import transformers

    preset = _preset(name)
    return getattr(transformers, _CLASSES[preset["model_type"]][0])(**preset["config"])


def build_encoder(name: str, device: str = "meta") -> nn.Module:
    """The bare encoder of preset ``name`` (embeddings + layers, no pooler), on ``device`` (meta: shapes only)."""
    import transformers

    preset = _preset(name)
    cls = getattr(transformers, _CLASSES[preset["model_type"]][1])
    config = hf_config(name)
    with torch.device(device):
        if preset["model_type"] == "electra":  # ELECTRA's encoder has no pooler
            return cls(config)
        return cls(config, add_pooling_layer=False)


def _preset(name: str) -> dict:
    if name not in HF_PRESETS:
        raise ValueError(f"Hugging Face preset {name!r} does not exist; known: {', '.join(sorted(HF_PRESETS))}")
    return HF_PRESETS[name]


def _entry(name: str) -> dict:
    c = HF_PRESETS[name]["config"]
    return {"model": {"arch": "hf", "hidden_size": c["hidden_size"], "ffn_size": c["intermediate_size"],
                      "num_layers": c["num_hidden_layers"], "num_heads": c["num_attention_heads"],
                      "vocab_size": c["vocab_size"], "max_seq_len": c["max_position_embeddings"]},
            "moe": {"num_experts": 8, "k": 2}}  # no drop_tokens: an upcycled model is dropless unless asked


MODEL_PRESET_ENTRIES: dict[str, dict[str, dict[str, Any]]] = {name: _entry(name) for name in HF_PRESETS}
"""The presets in ``pad_moe.presets.MODEL_PRESETS`` layout (for the registry; the paper's 8 experts, top-2)."""
