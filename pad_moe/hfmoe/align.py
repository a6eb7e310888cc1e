"""``padmoe compress --align``: permute each expert's hidden units to match a reference expert before W_s and the masks
are computed (MC-SMoE-style permutation alignment), so that the experts' mean, and a shared mask, line up units that
do the same job.

A gated expert y = W_down (act(W_gate x) ⊙ (W_up x)) computes the same function under any permutation P of its hidden
units applied to the gate rows, the up rows and the down columns (a sum over the units in another order: equal up
to floating-point summation order). Unit i of an expert is described by the concatenation [gate row i, up row i,
down column i] (3H values); expert k's units are matched to the reference's by a linear assignment maximising the
summed cosine similarity (``scipy.optimize.linear_sum_assignment``).

The reference of a block is its most-routed expert on the calibration text (ties: the lower id): the base then lines
up with the expert that carries the most tokens. The permutations need not be stored: the permuted experts are the
model (0 extra bytes).
"""

from __future__ import annotations

import torch
from torch import nn


def check_gated(name: str, experts: nn.Module, layout) -> tuple[int, int, int]:
    """(E, F, H) of a block's gated experts in the family's ``layout`` (pad_moe.hfmoe.families.layouts); one line for
    experts it does not describe."""
    if not layout.matches(experts):
        raise ValueError(f"--align permutes the hidden units of gated experts (gate, up, down per expert); "
                         f"{name}.experts ({type(experts).__name__}) are not the {layout.name} experts of its family: "
                         "drop --align")
    return layout.sizes(experts)


def unit_features(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(E, F, 3H) float64: each expert's hidden units as [gate row, up row, down column], L2-normalised."""
    F = down.shape[-1]
    feats = torch.cat([gate_up[:, :F], gate_up[:, F:], down.transpose(1, 2)], dim=-1).detach().double()
    return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def alignment_permutations(gate_up: torch.Tensor, down: torch.Tensor, reference: int) -> torch.Tensor:
    """(E, F) long: row k lists expert k's units in the reference's unit order (row ``reference`` is the identity),
    by a maximum-cosine-similarity linear assignment."""
    from scipy.optimize import linear_sum_assignment

    feats = unit_features(gate_up, down)
    E, F, _ = feats.shape
    perms = torch.arange(F).repeat(E, 1)
    for k in range(E):
        if k == reference:
            continue
        similarity = (feats[reference] @ feats[k].T).numpy()  # (F, F): reference unit i vs expert k's unit j
        rows, cols = linear_sum_assignment(similarity, maximize=True)
        perms[k, torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perms


def permute_units(gate_up: torch.Tensor, down: torch.Tensor, perms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert k's unit i becomes its old unit perms[k, i]: gate and up rows and down columns alike."""
    F = down.shape[-1]
    index = perms[:, :, None]
    gate = gate_up[:, :F].gather(1, index.expand(-1, -1, gate_up.shape[2]))
    up = gate_up[:, F:].gather(1, index.expand(-1, -1, gate_up.shape[2]))
    new_down = down.gather(2, perms[:, None, :].expand(-1, down.shape[1], -1))
    return torch.cat([gate, up], dim=1), new_down


def mean_similarity(gate_up: torch.Tensor, down: torch.Tensor) -> float:
    """Mean over expert pairs and units of the cosine similarity of unit i of one expert and unit i of the other."""
    feats = unit_features(gate_up, down)
    E = feats.shape[0]
    if E < 2:
        return 1.0
    pairs = [(feats[a] * feats[b]).sum(-1).mean() for a in range(E) for b in range(a + 1, E)]
    return float(torch.stack(pairs).mean())


def align_experts(model: nn.Module, references: dict[str, int]) -> dict[str, dict]:
    """Permute the experts of every sparse block of ``model`` (the family's own experts modules, in place, through
    their canonical form: biases of the units move with them) to its reference expert (block name -> expert id).
    Returns per block the reference, the mean unit similarity before and after and how many units moved."""
    from pad_moe.hfmoe.experts import moe_blocks
    from pad_moe.hfmoe.families import family_spec

    layout = family_spec(model).expert_layout
    blocks = moe_blocks(model)
    for name, block in blocks:
        check_gated(name, block.experts, layout)
    report = {}
    with torch.no_grad():
        for name, block in blocks:
            experts = block.experts
            gate_up, down = layout.canonical(experts)
            before = mean_similarity(gate_up, down)
            perms = alignment_permutations(gate_up, down, references[name])
            new_gate_up, new_down = permute_units(gate_up, down, perms)
            biases = dict(layout.biases(experts))
            if "gate_up_bias" in biases:  # (E, 2F): the gate then the up bias of each unit
                F = perms.shape[1]
                b = biases["gate_up_bias"]
                biases["gate_up_bias"] = torch.cat([b[:, :F].gather(1, perms), b[:, F:].gather(1, perms)], dim=1)
            for tensor_name, value in layout.native(new_gate_up, new_down, biases).items():
                getattr(experts, tensor_name).copy_(value)
            report[name] = {"reference": int(references[name]), "similarity_before": before,
                            "similarity_after": mean_similarity(new_gate_up, new_down),
                            "units_moved": int((perms != torch.arange(perms.shape[1])).sum())}
    return report


def most_routed(frequency: dict[str, torch.Tensor]) -> dict[str, int]:
    """Block name -> its most-routed expert (ties: the lower id)."""
    return {name: int(torch.sort(-counts.double(), stable=True).indices[0]) for name, counts in frequency.items()}
