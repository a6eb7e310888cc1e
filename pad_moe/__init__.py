"""pad_moe: partially dynamic Mixture-of-Experts (PAD-Net) on DeepSpeed.

Public names are imported lazily, so ``import pad_moe.data`` or ``padmoe config`` do not load DeepSpeed.
"""

import importlib

_EXPORTS = {
    "DenseFFNBlock": "pad_moe.moe.layer", "MoEFFN": "pad_moe.moe.layer", "PadMoE": "pad_moe.moe.layer",
    "build_ffn_block": "pad_moe.moe.layer", "ffn_block_from_dense": "pad_moe.moe.layer",
    "ffn_block_from_gated": "pad_moe.moe.layer",
    "pad_mix": "pad_moe.pad.mixing", "scale_factors_from_phi": "pad_moe.pad.mixing",
    "PadMaskMixin": "pad_moe.pad.protocol", "PadModule": "pad_moe.pad.protocol", "pad_modules": "pad_moe.pad.protocol",
    "upcycle": "pad_moe.models", "aux_loss": "pad_moe.models", "expert_counts": "pad_moe.models",
    "save_upcycled": "pad_moe.models", "load_upcycled": "pad_moe.models",
    "load_deployed": "pad_moe.deploy.export", "compress": "pad_moe.hfmoe.compress",
    "import_hf_moe": "pad_moe.hfmoe.experts",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pad_moe' has no attribute {name!r}")
