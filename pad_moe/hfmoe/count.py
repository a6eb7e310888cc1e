"""Parameter counts of an HF MoE (Mixtral, Qwen2/Qwen3-MoE, OLMoE) from its config.json alone (a folder, or a preset
of a published checkpoint's config: ``HF_MOE_PRESETS``), as it is (``moe``),
after ``padmoe compress`` at κ (``pad``), or merged to one FFN per layer (``static``).

The model is built on the meta device (no memory, no weights), so the counts are the family's own modules: tied
embeddings once, shared experts and routers in the non-expert part. Per sparse block with E experts of N = 3·F·H
weights and D = the dynamic entries of the partition (element: ⌊κN + ½⌋ per layer; neuron: ⌊κF + ½⌋ units × 3H):

    stored  moe: E·N        pad: (N − D) + E·D        static: N
    active  moe: k·N        pad: (N − D) + k·D        static: N      (per token, + every non-expert parameter)

A partition with ``scope=global`` (the IMP default) spreads D unevenly over layers; its total stored count is the same
to within rounding when every layer has the same N.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from pad_moe.errors import UsageError

HF_MOE_PRESETS: dict[str, tuple[str, dict]] = {
    # name -> (model_type, config fields) of published checkpoints (their config.json), for counting without weights
    "mixtral-8x7b": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2, tie_word_embeddings=False)),
    "olmoe-1b-7b": ("olmoe", dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                                  num_experts_per_tok=8, tie_word_embeddings=False)),
    "qwen1.5-moe-a2.7b": ("qwen2_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                            moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                            num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                            num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1,
                                            tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                        decoder_sparse_step=1, tie_word_embeddings=False)),
}


def is_hf_moe_target(target: str) -> bool:
    return target in HF_MOE_PRESETS or (os.path.isdir(target) and is_hf_moe_folder(target))


def _config(target: str):
    from transformers import CONFIG_MAPPING, AutoConfig

    if target in HF_MOE_PRESETS:
        model_type, fields = HF_MOE_PRESETS[target]
        return CONFIG_MAPPING[model_type](**fields)
    return AutoConfig.from_pretrained(target)


def is_hf_moe_folder(path: str) -> bool:
    """Whether ``path`` is a folder whose config.json names an HF MoE family pad_moe imports."""
    import json

    from pad_moe.hfmoe.experts import HF_MOE_FAMILIES

    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return json.load(f).get("model_type") in HF_MOE_FAMILIES
    except (OSError, ValueError):
        return False


def count_hf_moe(path: str, *, mode: str = "moe", kappa: Optional[float] = None, k: Optional[int] = None,
                 granularity: str = "element", dtype_bytes: int = 4) -> dict:
    from transformers import AutoModelForCausalLM

    from pad_moe.hfmoe.experts import family_of, moe_blocks
    from pad_moe.partition import dynamic_count

    if mode not in ("moe", "pad", "static"):
        raise UsageError(f"--mode {mode} is unknown for an HF MoE; use moe, pad or static")
    if mode == "pad" and (kappa is None or not 0 < kappa <= 1):
        raise UsageError(f"--mode pad needs --kappa in (0, 1], got {kappa}")
    if mode != "pad" and kappa is not None:
        raise UsageError(f"--kappa applies to --mode pad, not --mode {mode}")
    if granularity not in ("element", "neuron"):
        raise UsageError(f"--granularity {granularity} is unknown; use element or neuron")
    config = _config(path)
    family = family_of(config)
    k = config.num_experts_per_tok if k is None else k
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    stored = active = total
    blocks = moe_blocks(model)
    for _, block in blocks:
        E, F2, H = block.experts.gate_up_proj.shape
        F = F2 // 2
        N = 3 * F * H
        if not 1 <= k <= E:
            raise UsageError(f"--k {k} must be between 1 and the {E} experts per layer")
        if mode == "pad":
            D = (dynamic_count(kappa, N) if granularity == "element" else dynamic_count(kappa, F) * 3 * H)
        else:
            D = N if mode == "moe" else 0
        stored -= E * N - ((N - D) + E * D)
        active -= E * N - ((N - D) + k * D)
    name = path if path in HF_MOE_PRESETS else os.path.basename(os.path.abspath(path))
    return {"name": name, "family": family, "mode": mode, "kappa": kappa,
            "granularity": granularity if mode == "pad" else None, "experts": E if blocks else 0, "k": k,
            "moe_layers": len(blocks), "params": int(stored), "params_training": int(total),
            "params_active": int(active), "bytes": int(stored) * dtype_bytes}
