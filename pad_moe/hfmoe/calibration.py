"""Statistics of a plain HF MoE on calibration batches, summed over the ranks (each rank passes its own batches):
how often the router picks each expert, the experts' diagonal Fisher (``--static-init fisher``) and REAP saliency
(``--method reap``). Collectives: ``pad_moe.distributed.all_reduce_`` (the identity in one process)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def all_reduced_frequency(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Block name -> (E,) router counts over every rank's batches."""
    from pad_moe import distributed as D
    from pad_moe.hfmoe.experts import router_frequencies

    counts = router_frequencies(model, batches, lambda m, b: m(input_ids=b["input_ids"]))
    return {name: D.all_reduce_(c) for name, c in counts.items()}


def expert_fisher(model: nn.Module, batches, loss_fn: Callable) -> dict[str, dict[str, torch.Tensor]]:
    """Block name -> {"gate_up_proj": (E, 2F, H), "down_proj": (E, H, F)}: the mean over every rank's batches of the
    squared gradient of ``loss_fn(model, batch)`` (the calibration next-token loss) w.r.t. each expert weight, float64.
    Only the experts' weights take gradients; requires_grad and .grad of every parameter are restored."""
    from pad_moe import distributed as D
    from pad_moe.hfmoe.experts import moe_blocks
    from pad_moe.partition.collectives import world_size

    blocks = moe_blocks(model)
    weights = {name: {"gate_up_proj": b.experts.gate_up_proj, "down_proj": b.experts.down_proj} for name, b in blocks}
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    sums = {name: {k: torch.zeros(w.shape, dtype=torch.float64) for k, w in ws.items()} for name, ws in weights.items()}
    inputs = [w for ws in weights.values() for w in ws.values()]
    try:
        for p, _, _ in flags:
            p.requires_grad_(False)
        for w in inputs:
            w.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), inputs, allow_unused=True)
            it = iter(grads)
            for name, ws in weights.items():
                for key in ws:
                    g = next(it)
                    if g is not None:
                        sums[name][key] += g.double().square()
    finally:
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
    count = len(batches) * world_size()
    return {name: {k: D.all_reduce_(v) / count for k, v in ws.items()} for name, ws in sums.items()}


def reap_saliency(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Block name -> (E,) REAP saliency (arXiv 2510.13999): the mean over the tokens routed to expert j of its gate
    weight × the L2 norm of its output, over every rank's batches (0 for an expert no token reached). The experts'
    output is the family's own experts module run on the expert's tokens alone (weight 1); families whose experts are
    called ``experts(hidden, top_k_index, top_k_weights)``."""
    from pad_moe import distributed as D
    from pad_moe.hfmoe.experts import block_router, moe_blocks

    totals, counts, handles, inside = {}, {}, [], []
    for name, block in moe_blocks(model):
        E = block_router(model, block).weight.shape[0]
        totals[name], counts[name] = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)

        def hook(experts, args, _name=name, _E=E):
            if inside:  # the expert outputs computed below
                return
            x, index, weight = args[0], args[1], args[2]
            inside.append(True)
            try:
                for e in torch.unique(index).tolist():
                    if e >= _E:  # a dropped slot
                        continue
                    token, slot = torch.where(index == e)
                    alone = torch.full((token.numel(), 1), e, dtype=index.dtype, device=index.device)
                    out = experts(x[token], alone, torch.ones(token.numel(), 1, dtype=weight.dtype,
                                                              device=weight.device))
                    totals[_name][e] += float((weight[token, slot].double() * out.double().norm(dim=-1)).sum())
                    counts[_name][e] += token.numel()
            finally:
                inside.pop()

        handles.append(block.experts.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in totals:
        total, count = D.all_reduce_(totals[name]), D.all_reduce_(counts[name])
        out[name] = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    return out
