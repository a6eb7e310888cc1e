"""Parameter counts of a live model, in training form and in compact (deploy) form.

Training form counts every parameter, experts of all expert-parallel ranks included. Compact form is what a deployed
PAD model stores: for each PAD weight, the static value where M=0 (once) and each expert's value where M=1; a MoE-P
layer (static part dropped) keeps only the M=1 expert values. Compacted (neuron) layers already are in compact form.
A PAD-DyConv layer keeps its static kernel where M=0 and its K kernels where M=1.
"""

from __future__ import annotations

import torch
from torch import nn

from pad_moe.moe.layer import PadMoE


def _numel(p: torch.Tensor) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it (then ``p.numel()`` is this rank's share or 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def _is_expert(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def count_live(model: nn.Module, ep_size: int = 1) -> dict[str, int]:
    """{"params_training", "params_compact"} of ``model`` whose expert parameters are this rank's share of ep_size.

    Per-expert masks are counted from this rank's experts and scaled by ep_size (exact when every expert-parallel rank
    has the same number of dynamic entries; the trainer all-reduces the exact figure when it matters).
    """
    training = sum(_numel(p) * (ep_size if _is_expert(p) else 1) for p in model.parameters())
    compact = training
    from pad_moe.vision.layers import PadDynamicConv2d

    for module in model.modules():
        stored = getattr(module, "stored_params", None)
        if callable(stored):  # a PAD module that counts its own compact form (HF MoE experts, not expert-parallel)
            compact -= sum(_numel(p) for p in module.parameters(recurse=False)) - stored()
            continue
        if isinstance(module, PadDynamicConv2d):
            mask = module.weight_masks()["weight"]
            dynamic, kernels = int(mask.sum()), module.num_kernels
            compact -= dynamic + kernels * (mask.numel() - dynamic)  # W_s where M=1, the K kernels where M=0
            continue
        if not isinstance(module, PadMoE) or module.compacted:
            continue
        static = dict(module.static.named_parameters())
        experts = module.local_experts
        full_global = sum(_numel(p) for p in static.values()) + ep_size * sum(
            _numel(p) for e in experts for p in e.parameters())
        kept_static, kept_dynamic = 0, 0
        holders = ([""] if module.mask_sharing == "layer"
                   else [f"e{gid}." for gid in module.global_expert_ids])
        per_holder = {h: module.weight_masks(h) for h in holders}
        for name, w in static.items():
            dyn = [per_holder[h][name].expand(w.shape) for h in holders]
            any_static = ~torch.stack(dyn).all(0)
            if not module.static_dropped:
                kept_static += int(any_static.sum())
            kept_dynamic += sum(int(d.sum()) for d in dyn) * (len(experts) if module.mask_sharing == "layer" else 1)
        compact -= full_global - kept_static - kept_dynamic * ep_size
    return {"params_training": int(training), "params_compact": int(compact)}
