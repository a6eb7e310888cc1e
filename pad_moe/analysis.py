"""Dynamic-property metrics (paper Fig. 6, after Li et al. 2021): how much the parameters a token gets, and the outputs
it produces, vary across the tokens of a batch.

For an MoE layer token s gets the effective FFN weights w_s = Σ_k G[s, k]·W_k_eff (G: gate values, zero for unused
experts). Per weight entry p, Var_s(w_s[p]) = Σ_{k,l} Cov_s(G)[k, l]·W_k[p]·W_l[p]; summed over entries this is
Σ_{k,l} Cov(G)[k, l]·⟨W_k, W_l⟩, so only the E×E Gram matrix of expert weights is needed, never per-token weights.
``parameter_variance`` reports the mean over entries; ``output_variance`` the mean over hidden units of the variance of
the layer output across tokens. A dense layer has parameter variance 0.
"""

from __future__ import annotations

import torch
from torch import nn

from pad_moe.moe.layer import MoEFFN


def effective_expert_weights(layer: MoEFFN) -> torch.Tensor:
    """(E_local, P): every local expert's effective FFN weights, flattened (PAD: the mixed weights), the stacked
    weights the dropless dispatch computes with."""
    stacked = layer.expert_weights()
    return torch.cat([w.reshape(w.shape[0], -1) for w in stacked.values()], dim=1)


@torch.no_grad()
def dynamic_properties(model: nn.Module, run_forward, *, reduce_sum=None, gather_experts=None
                       ) -> dict[str, dict[str, float]]:
    """Per MoE layer: parameter and output variance across the tokens that ``run_forward()`` feeds to ``model`` (one
    or several forwards; the moments accumulate).

    One process: all experts must be local (e.g. a consolidated model). Distributed: ``reduce_sum(t)`` sums a tensor
    over the data-parallel ranks in place, ``gather_experts(layer, rows)`` returns every expert's rows (E, P) in global
    expert order from this rank's (E_local, P); the result is then identical on every rank.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoEFFN)]
    moments: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, layer in layers:
        if layer.ep_size != 1 and gather_experts is None:
            raise ValueError(f"dynamic_properties needs all experts local; layer {name} has ep_size={layer.ep_size}: "
                             "consolidate the checkpoint first (padmoe consolidate)")

        def route_hook(experts, weights, name=name, num_experts=layer.num_experts):
            S = experts.shape[0]  # experts (S, k), -1 where dropped; weights (S, k)
            G = torch.zeros(S, num_experts, dtype=torch.float64)
            for k in range(experts.shape[1]):
                keep = experts[:, k] >= 0
                G[torch.arange(S)[keep], experts[:, k][keep]] += weights[:, k][keep].double()
            _accumulate(moments.setdefault(name, {}), "g", G)

        def out_hook(_m, _i, out, name=name):
            y = out[0].detach().reshape(-1, out[0].shape[-1]).double()
            _accumulate(moments.setdefault(name, {}), "y", y)

        hooks.append(layer.observe_routes(route_hook))
        hooks.append(layer.register_forward_hook(out_hook))
    try:
        run_forward()
    finally:
        for h in hooks:
            h.remove()
    result = {}
    for name, layer in layers:
        m = moments[name]
        if reduce_sum is not None:
            for key in sorted(m):
                reduce_sum(m[key])
        n, mean_g = m["g_n"], m["g_sum"] / m["g_n"]
        cov = m["g_outer"] / n - torch.outer(mean_g, mean_g)  # (E, E) across tokens
        W = effective_expert_weights(layer).double()  # (E_local, P)
        if gather_experts is not None:
            W = gather_experts(layer, W)
        gram = W @ W.t()
        mean_y = m["y_sum"] / m["y_n"]
        result[name] = {"parameter_variance": float((cov * gram).sum() / W.shape[1]),
                        "output_variance": float((m["y_sq"] / m["y_n"] - mean_y ** 2).mean())}
    return result


def _accumulate(m: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> None:
    """Running sums of x (S, D): count, sum, and (gates) the outer-product sum or (outputs) the sum of squares."""
    second = x.t() @ x if key == "g" else (x * x).sum(0)
    parts = {f"{key}_n": torch.tensor(float(x.shape[0]), dtype=torch.float64), f"{key}_sum": x.sum(0),
             f"{key}_outer" if key == "g" else f"{key}_sq": second}
    for k, v in parts.items():
        m[k] = m[k] + v if k in m else v


@torch.no_grad()
def expert_divergence(model: nn.Module) -> dict[str, float]:
    """Per MoE layer whose experts are all local: how far its experts have moved apart, the mean over weight entries
    of the variance across experts divided by the mean squared entry (0: identical copies, as right after exact
    upcycling; about 1 for independently initialised experts). Layers split over expert-parallel ranks are left out."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoEFFN):
            if module.ep_size != 1:
                continue
            W = effective_expert_weights(module).double()
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and module.gate_up_proj.dim() == 3:
            W = torch.cat([module.gate_up_proj.detach().flatten(1), module.down_proj.detach().flatten(1)], 1).double()
        else:
            continue
        if W.shape[0] < 2:
            continue
        out[name] = float(W.var(0, unbiased=False).mean() / W.pow(2).mean().clamp_min(1e-30))
    return out
