"""Expert-pruning baselines of ``padmoe compress``, written as plain HF MoEs with fewer experts:

- ``drop``: keep the experts the router picks most on the calibration text;
- ``reap`` (REAP, arXiv 2510.13999): keep the experts of highest saliency, the mean over the tokens routed to an
  expert of gate weight × ‖expert output‖₂ (``pad_moe.hfmoe.calibration.reap_saliency``).

Both keep the same number of experts in every block (ties: the lower id), slice the router's rows (and every other
tensor with one row per expert, ``pad_moe.hfmoe.families``) to the kept experts and keep the family's own top-k
normalisation: Mixtral renormalises the top-k weights (softmax over the top-k);
Qwen2-MoE / Qwen3-MoE / OLMoE do so when their config's ``norm_topk_prob`` is set, and otherwise take the softmax over
the kept experts' logits (the sliced router), unnormalised over the top-k, as the family does for its own experts.
"""

from __future__ import annotations

import torch
from torch import nn


def top_experts(scores: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """Block name -> the ids of its ``keep`` highest-scoring experts, ascending (ties: the lower id)."""
    return {name: torch.sort(torch.sort(-s.double(), stable=True).indices[:keep]).values for name, s in scores.items()}


def keep_experts(model: nn.Module, chosen: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, list[int]]]:
    """A new model of the same family holding only the ``chosen`` experts of every block: every tensor with one row
    per expert (the router's, the experts' own; the family's ``expert_indexed``) sliced, the config changed as the
    family needs (``drop_config``)."""
    from transformers import AutoModelForCausalLM

    from pad_moe.hfmoe.families import family_spec

    config = model.config
    spec = family_spec(config)
    keep = {len(c) for c in chosen.values()}
    if len(keep) != 1:
        raise ValueError(f"every block must keep as many experts; got {sorted(keep)}")
    keep = keep.pop()
    new_config = config.__class__.from_dict({**config.to_dict(), spec.experts_key: keep,
                                             "num_experts_per_tok": min(config.num_experts_per_tok, keep),
                                             **spec.drop_config(config, keep)})
    indexed = {name: block for block in chosen for name in spec.expert_indexed(block)}
    state = {name: tensor[chosen[indexed[name]]].clone() if name in indexed else tensor
             for name, tensor in model.state_dict().items()}
    smaller = AutoModelForCausalLM.from_config(new_config, dtype=torch.float32)
    smaller.load_state_dict(state, strict=True)
    smaller.generation_config = model.generation_config  # built from its config: keep the source's generate() settings
    return smaller, {b: c.tolist() for b, c in chosen.items()}
