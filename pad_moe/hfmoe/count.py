"""Parameter counts of an HF MoE (Mixtral, Qwen2/Qwen3-MoE, OLMoE) from its config.json alone, as it is (``moe``),
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
    from transformers import AutoConfig, AutoModelForCausalLM

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
    config = AutoConfig.from_pretrained(path)
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
    return {"name": os.path.basename(os.path.abspath(path)), "family": family, "mode": mode, "kappa": kappa,
            "granularity": granularity if mode == "pad" else None, "experts": E if blocks else 0, "k": k,
            "moe_layers": len(blocks), "params": int(stored), "params_training": int(total),
            "params_active": int(active), "bytes": int(stored) * dtype_bytes}
