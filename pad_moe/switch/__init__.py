"""Switch Transformers (Hugging Face) with PAD-MoE / MoE sparse FFNs on DeepSpeed: presets, counts, conversion of
HF checkpoints, and the span-corruption pre-training job. Names are imported lazily: counting loads no DeepSpeed."""

import importlib

_EXPORTS = {
    "count_switch": "pad_moe.switch.count", "count_table": "pad_moe.switch.count",
    "SwitchModel": "pad_moe.switch.model", "SwitchSparseFFN": "pad_moe.switch.model",
    "build_switch": "pad_moe.switch.model", "from_hf": "pad_moe.switch.model", "load_hf_switch": "pad_moe.switch.model",
    "SWITCH_ARCHS": "pad_moe.switch.presets", "SwitchArch": "pad_moe.switch.presets", "get_arch": "pad_moe.switch.presets",
    "registry_entries": "pad_moe.switch.presets", "switch_names": "pad_moe.switch.presets",
    "build_switch_job": "pad_moe.switch.job",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pad_moe.switch' has no attribute {name!r}")
