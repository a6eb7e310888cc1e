"""Helpers shared by the layer tests: random partition masks and experts moved away from their upcycled copy."""

from __future__ import annotations

import torch


def random_masks(layer, p: float = 0.5, seed: int = 1) -> dict[str, torch.Tensor]:
    """A bool mask per mask name of ``layer``, each entry dynamic with probability ``p``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) < p for k, v in layer.masks().items()}


def perturb_experts_(layer, scale: float = 0.2, seed: int = 2) -> None:
    """Add seeded noise to every local expert's parameters (upcycled experts equal the static weight)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for expert in layer.local_experts:
            for p in expert.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


def per_expert_named(named, first_expert: int = 0) -> dict:
    """``named`` (name -> tensor: parameters, their gradients) with every grouped expert parameter
    (``...deepspeed_moe.experts.fc1_weight``, (E_local, ...)) split into its experts under their checkpoint names with
    global ids from ``first_expert`` (``...deepspeed_experts.{id}.fc1.weight``): the names every ep layout shares."""
    from pad_moe.deploy.checkpoint import GROUPED_PARAM, grouped_expert_keys

    out = {}
    for name, t in dict(named).items():
        if GROUPED_PARAM.match(name) and t is not None:
            out.update(zip(grouped_expert_keys(name, first_expert, t.shape[0]), t.unbind(0)))
        else:
            out[name] = t
    return out
