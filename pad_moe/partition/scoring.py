"""Mask scores for IMP, one float per mask entry of this rank, already summed over the ranks that share them.

- snip: |Σ_batches ∂L/∂M| with M relaxed to real values (the current mask as 0/1 floats); for the PAD formula
  ∂L/∂M = ∂L/∂Θ ⊙ (λd·W_dyn − λs·W_s), a first-order estimate of the loss change from switching an entry's mode.
- magnitude: |λd·W_dyn − λs·W_s| from each module's ``magnitude_scores()``.
- random: uniform, reproducible from (seed, round, module, mask) whatever the ranks.

Scores are not divided by their global sum: a positive scale changes no ranking, and rounding could merge values.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from pad_moe.partition import collectives as C
from pad_moe.partition.layout import MaskLayout

SCORERS = ("snip", "magnitude", "random")


def score_entries(layout: MaskLayout, scorer: str, *, model=None, batches: Sequence = (),
                  loss_fn: Callable | None = None, seed: int = 0, round_index: int = 0) -> torch.Tensor:
    """Scores of this rank's entries, float32 (n,), in ``layout`` order."""
    if scorer == "snip":
        return _snip(layout, model, batches, loss_fn)
    if scorer == "magnitude":
        return _magnitude(layout)
    if scorer == "random":
        return _random(layout, seed, round_index)
    raise ValueError(f"scorer={scorer!r} is unknown; allowed: {', '.join(SCORERS)}")


def _snip(layout: MaskLayout, model, batches: Sequence, loss_fn) -> torch.Tensor:
    relaxed = [{n: m.detach().to(torch.float32).requires_grad_(True) for n, m in module.masks().items()}
               for _, module in layout.modules]
    inputs = [relaxed[s.module_index][s.mask_name] for s in layout.slots]
    grad_sum = torch.zeros(layout.numel, dtype=torch.float32, device=layout.device)  # (n,)
    missing = torch.zeros(len(layout.modules), dtype=torch.int64, device=layout.device)  # (M,) 1: a None gradient
    for (_, module), masks in zip(layout.modules, relaxed, strict=True):
        module.set_relaxed_masks(masks)
    try:
        for batch_index, batch in enumerate(batches):
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn returned {type(loss).__name__} of shape "
                                 f"{tuple(getattr(loss, 'shape', ()))} for batch {batch_index}; it must return a "
                                 "scalar loss tensor")
            grads = [None] * len(inputs)
            if loss.requires_grad:
                grads = torch.autograd.grad(loss.reshape(()), inputs, allow_unused=True)
            for slot, grad in zip(layout.slots, grads, strict=True):
                if grad is None:
                    missing[slot.module_index] = 1
                else:
                    grad_sum[slot.offset:slot.offset + slot.numel] += grad.reshape(-1)
    finally:
        for _, module in layout.modules:
            module.set_relaxed_masks(None)
    sharded = layout.sharded
    grad_sum[~sharded] = C.world_reducer().sum(grad_sum[~sharded])
    grad_sum[sharded] = C.expert_data_parallel_reducer(layout.expert_group).sum(grad_sum[sharded])
    scores = grad_sum.abs_()
    _check_signal(layout, scores, missing, "snip")
    return scores


def _magnitude(layout: MaskLayout) -> torch.Tensor:
    scores = torch.zeros(layout.numel, dtype=torch.float32, device=layout.device)  # (n,)
    per_module = [module.magnitude_scores() for _, module in layout.modules]
    for s in layout.slots:
        scores[s.offset:s.offset + s.numel] = per_module[s.module_index][s.mask_name].reshape(-1)
    # A layer-shared mask's magnitude sums over this rank's experts only: add the other expert-parallel ranks'.
    by_group: dict[str, torch.Tensor] = {}
    for s in layout.slots:
        group = layout.modules[s.module_index][1].expert_group_name
        if not s.sharded and group is not None:
            sel = by_group.setdefault(group, torch.zeros(layout.numel, dtype=torch.bool, device=layout.device))
            sel[s.offset:s.offset + s.numel] = True
    for group in sorted(by_group):
        sel = by_group[group]
        scores[sel] = C.expert_parallel_reducer(group).sum(scores[sel])
    _check_signal(layout, scores, torch.zeros(len(layout.modules), dtype=torch.int64, device=layout.device),
                  "magnitude")
    return scores


def _random(layout: MaskLayout, seed: int, round_index: int) -> torch.Tensor:
    parts = []
    for s in layout.slots:
        key = ((seed * 1_000_003 + round_index) * 65_537 + s.module_index) * 65_536 + s.ordinal
        gen = torch.Generator().manual_seed(key % (1 << 63))
        parts.append(torch.rand(s.numel, generator=gen))
    return torch.cat(parts).to(layout.device)


def _check_signal(layout: MaskLayout, scores: torch.Tensor, missing: torch.Tensor, scorer: str) -> None:
    """Raise (on every rank alike) if a module's masks got no gradient, or only zero scores over all ranks."""
    has_signal = torch.zeros(len(layout.modules), dtype=torch.int64, device=layout.device)  # (M,)
    for s in layout.slots:
        has_signal[s.module_index] |= bool((scores[s.offset:s.offset + s.numel] > 0).any())
    flags = C.world_reducer().max(torch.cat([missing, has_signal]))  # (2M,)
    names = [name for name, _ in layout.modules]
    m = len(names)
    without = [names[i] for i in range(m) if flags[i]]
    if without:
        raise ValueError(f"the batches give no gradient to the masks of PAD module(s) {without}: loss_fn's loss does "
                         "not depend on them (check that loss_fn runs the model on the batch)")
    zero = [names[i] for i in range(m) if not flags[m + i]]
    if zero:
        raise ValueError(f"scorer={scorer!r} gives all-zero scores for PAD module(s) {zero}: λd·W_dyn equals "
                         "λs·W_s there (e.g. an exactly upcycled model, experts = static weight), so switching an "
                         "entry's mode changes nothing to first order. Train the MoE briefly before partitioning, "
                         "or use method='random'")
