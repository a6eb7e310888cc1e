"""Named presets in one registry. A preset fills config sections; keys the user set explicitly win."""

from __future__ import annotations

from typing import Any

MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Tiny toy encoder that CI trains in seconds on 2 CPU ranks.
    "debug": {
        "model": {"arch": "toy", "hidden_size": 32, "ffn_size": 64, "num_layers": 2, "num_heads": 2,
                  "vocab_size": 64, "max_seq_len": 16},
        "moe": {"num_experts": 4, "k": 2, "min_capacity": 0},
    },
    # The same with neuron-granularity masks, compacted after partition.
    "debug-neuron": {
        "model": {"arch": "toy", "hidden_size": 32, "ffn_size": 64, "num_layers": 2, "num_heads": 2,
                  "vocab_size": 64, "max_seq_len": 16},
        "moe": {"num_experts": 4, "k": 2, "min_capacity": 0, "granularity": "neuron", "compact": True},
    },
    # all-MiniLM-L6-v2 (6 layers, H=384, F=1536; offline pip package), 8 experts top-2 on every FFN (paper setup).
    # Its sizes come from its own config.json; upcycled models are dropless unless moe.drop_tokens=true.
    "minilm": {
        "model": {"arch": "hf", "path": "minilm", "pooling": "mean"},
        "moe": {"num_experts": 8, "k": 2, "min_capacity": 0},
    },
    # Its first two layers: a real pretrained model that trains in minutes on 2 CPU cores.
    "minilm-2l": {
        "model": {"arch": "hf", "path": "minilm", "num_layers": 2, "pooling": "mean"},
        "moe": {"num_experts": 8, "k": 2, "min_capacity": 0},
    },
    # A wider toy encoder (BERT-base FFN shape, 2 layers) for benchmarks.
    "toy-bert-ffn": {
        "model": {"arch": "toy", "hidden_size": 768, "ffn_size": 3072, "num_layers": 2, "num_heads": 12,
                  "vocab_size": 1024, "max_seq_len": 128},
        "moe": {"num_experts": 8, "k": 2},
    },
    # A tiny Mixtral-style decoder from scratch (2 layers, 4 experts top-2) on real text: tests and smoke runs.
    "lm-debug": {
        "model": {"arch": "causal_lm", "family": "mixtral", "hidden_size": 32, "ffn_size": 48, "num_layers": 2,
                  "num_heads": 4, "vocab_size": 320, "max_seq_len": 64},
        "moe": {"mode": "moe", "num_experts": 4, "k": 2, "aux_loss_coef": 0.01},
        "data": {"task": "vader", "max_length": 32},
    },
    # The small Mixtral-style MoE pre-trained here for the compression evidence (21.4M parameters: 4 layers, H=256,
    # 8 experts of F=640, top-2, 8,192 BPE ids) on WordNet glosses + the VADER sentences (1.9M words).
    "lm-mixtral-20m": {
        "model": {"arch": "causal_lm", "family": "mixtral", "hidden_size": 256, "ffn_size": 640, "num_layers": 4,
                  "num_heads": 4, "vocab_size": 8192, "max_seq_len": 256},
        "moe": {"mode": "moe", "num_experts": 8, "k": 2, "aux_loss_coef": 0.01},
        "data": {"task": "wordnet+vader", "max_length": 128},
    },
}


def _merge_external() -> None:
    """Presets defined beside the code that uses them (published Hugging Face encoders for counting)."""
    from pad_moe.deploy.hf_presets import MODEL_PRESET_ENTRIES
    from pad_moe.switch.presets import registry_entries

    for name, entry in MODEL_PRESET_ENTRIES.items():
        MODEL_PRESETS.setdefault(name, entry)
    for name, entry in registry_entries().items():  # Switch backbones pre-train on span corruption
        MODEL_PRESETS.setdefault(name, {**entry, "data": {"task": "span_corruption", **entry.get("data", {})}})


_merge_external()


def preset_names() -> list[str]:
    return sorted(MODEL_PRESETS)


def apply_model_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Fill ``data`` from the preset named in data['model']['preset'], explicit keys first.

    No preset: ``debug`` for model.arch=toy (the default arch); none otherwise (hf: the sizes come from the checkpoint's
    config.json and the moe section from the MoEConfig defaults; switch needs a preset; vision has its own section).
    A preset made for another model.arch than the one set explicitly is refused.
    """
    model = data.setdefault("model", {})
    if not isinstance(model, dict):
        raise ValueError(f"model must be a mapping, got {type(model).__name__}")
    name = model.get("preset")
    if name is None:
        if model.get("arch", "toy") != "toy":
            return data
        name = model["preset"] = "debug"
    if name not in MODEL_PRESETS:
        raise ValueError(f"model.preset={name!r} does not exist; known presets: {', '.join(preset_names())}")
    preset_arch = MODEL_PRESETS[name]["model"].get("arch", "toy")
    if model.get("arch", preset_arch) != preset_arch:
        raise ValueError(f"model.preset={name} is a model.arch={preset_arch} preset, but model.arch={model['arch']}; "
                         f"drop model.preset or pick a model.arch={model['arch']} preset (padmoe presets)")
    for section, values in MODEL_PRESETS[name].items():
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ValueError(f"{section} must be a mapping, got {type(target).__name__}")
        for key, value in values.items():
            target.setdefault(key, value)
    return data
