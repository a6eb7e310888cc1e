"""Dropless MoE dispatch: every routed token is computed, tokens grouped by expert, one grouped GEMM per matrix.

DeepSpeed's MoE pads every expert to one capacity; without dropping, that capacity is the busiest expert's load, so a
skewed router (the normal case right after upcycling) multiplies the expert time. Here the (token, expert) routes are
sorted by expert and each expert computes exactly its rows (``pad_moe.moe.grouped``); with ``ep_size > 1`` the rows
travel to the rank holding their expert in one variable-size all-to-all (``pad_moe.moe.exchange``) and back.

Routing and losses are DeepSpeed's ``TopKGate`` formulas (softmax in fp32; top-1 weight = the gate probability; top-2 /
top-k weights renormalised over the chosen experts; top-2's second expert Gumbel-sampled in training when asked; the
same load-balancing ``l_aux`` and expert counts), so with a capacity no token exceeds both dispatches compute the
same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pad_moe.moe.exchange import AllToAllV, exchange_counts
from pad_moe.moe.grouped import grouped_linear

DISPATCHES = ("capacity", "dropless")
"""capacity: DeepSpeed's MoE (capacity factor, tokens over capacity dropped, or padded to the busiest expert when
``drop_tokens=False``) | dropless: every route computed, grouped by expert, no padding."""


@dataclass
class Routes:
    """The router's decision for S tokens: k experts each, their combine weights and the gate's statistics."""

    experts: torch.Tensor
    """(S, k) int64 expert ids."""
    weights: torch.Tensor
    """(S, k) fp32 combine weights."""
    l_aux: torch.Tensor
    """DeepSpeed's load-balancing loss (fp32 scalar)."""
    exp_counts: torch.Tensor
    """(E,) int64 routes per expert on this rank."""


def _token_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens (dim 0); zeros, still in the graph, on a rank with no tokens (the mean of none is NaN)."""
    return t.mean(0) if t.shape[0] else t.sum(0)


def route(logits: torch.Tensor, k: int, *, sample_second: bool = False) -> Routes:
    """Top-k routing of fp32 logits (S, E) with DeepSpeed's weights and aux loss (top1/top2/topkgating)."""
    gates = F.softmax(logits, dim=1)
    num_experts = gates.shape[1]
    me = _token_mean(gates)
    eps = torch.finfo(gates.dtype).eps
    if k == 1:
        experts = gates.argmax(1, keepdim=True)
        weights = gates.gather(1, experts)
        ce = _token_mean(F.one_hot(experts[:, 0], num_experts).float())
        l_aux = (me * ce).sum() * num_experts
    elif k == 2:
        first = gates.argmax(1)
        scores = logits
        if sample_second:  # Gumbel-max: the second expert drawn in proportion to its gate (GShard)
            scores = logits - torch.empty_like(logits).exponential_().log()
        second = scores.masked_fill(F.one_hot(first, num_experts).bool(), float("-inf")).argmax(1)
        experts = torch.stack([first, second], 1)
        weights = gates.gather(1, experts)
        weights = weights / weights.sum(1, keepdim=True).clamp(min=eps)
        ce = _token_mean(F.one_hot(first, num_experts).float())
        l_aux = (me * ce).mean() * num_experts * num_experts
    else:
        top, experts = torch.topk(gates, k, dim=1)
        weights = top / top.sum(1, keepdim=True).clamp(min=eps)
        ce = _token_mean(torch.zeros_like(gates).scatter_(1, experts, 1.0))
        l_aux = (me * ce).mean() * num_experts * num_experts / k
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts)
    return Routes(experts, weights, l_aux, counts)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


class _ToLocalExperts:
    """The expert-parallel leg: rows sorted by global expert go to the rank holding the expert, are regrouped by
    local expert there, and come back in the same order (``back``)."""

    def __init__(self, counts: torch.Tensor, ep_size: int, group):
        num_local = counts.numel() // ep_size
        send = counts.view(ep_size, num_local)
        recv = exchange_counts(send, group)  # recv[r, j]: rows from rank r for local expert j
        self.send_splits, self.recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        self.group = group
        # received rows come grouped by source rank, then local expert: reorder them by (local expert, source)
        key = (torch.arange(num_local, device=counts.device) * ep_size).unsqueeze(0) + \
            torch.arange(ep_size, device=counts.device).unsqueeze(1)
        row_key = torch.repeat_interleave(key.reshape(-1), recv.reshape(-1))
        self.order = torch.argsort(row_key, stable=True)
        self.counts = recv.sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return AllToAllV.apply(x, self.send_splits, self.recv_splits, self.group).index_select(0, self.order)

    def back(self, y: torch.Tensor) -> torch.Tensor:
        return AllToAllV.apply(y.index_select(0, _inverse(self.order)), self.recv_splits, self.send_splits,
                               self.group)


def dispatch_and_combine(x: torch.Tensor, routes: Routes,
                         experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, ep_size: int = 1,
                         group=None) -> torch.Tensor:
    """x (S, H) -> Σ_k weight_k · expert_k(x) (S, H). ``experts(rows, counts)`` computes this rank's local experts on
    rows grouped by local expert (``counts`` per local expert)."""
    num_tokens, k = routes.experts.shape
    order = torch.argsort(routes.experts.reshape(-1), stable=True)  # routes sorted by expert, tokens in order
    rows = x.index_select(0, order // k)
    counts = routes.exp_counts
    if ep_size > 1:
        leg = _ToLocalExperts(counts, ep_size, group)
        out = leg.back(experts(leg.forward(rows), leg.counts))
    else:
        out = experts(rows, counts)
    by_route = out.index_select(0, _inverse(order)).view(num_tokens, k, out.shape[-1])  # -1 is ambiguous at 0 tokens
    # the weights are fp32: the sum over routes accumulates in fp32, as DeepSpeed's combine does
    return (by_route * routes.weights.unsqueeze(-1)).sum(1).to(x.dtype)


def expert_ffn(rows: torch.Tensor, counts: torch.Tensor, weights: dict[str, torch.Tensor], expert_type: str,
               act) -> torch.Tensor:
    """The FFN of each local expert on its rows: ``weights`` stacked per expert, names as an expert's
    ``named_parameters`` (mlp: fc1/fc2, glu: gate_proj/up_proj/down_proj; biases optional)."""
    sizes = counts.tolist()

    def linear(name: str, inputs: torch.Tensor) -> torch.Tensor:
        return grouped_linear(inputs, weights[f"{name}.weight"], counts, sizes, weights.get(f"{name}.bias"))

    if expert_type == "mlp":
        return linear("fc2", act(linear("fc1", rows)))
    return linear("down_proj", act(linear("gate_proj", rows)) * linear("up_proj", rows))


def check_dropless_args(noisy_gate_policy: Optional[str], drop_tokens: bool) -> None:
    """ValueError for gate options that have no meaning without a capacity."""
    if noisy_gate_policy not in (None, "None"):
        raise ValueError(f"noisy_gate_policy={noisy_gate_policy!r} is DeepSpeed's capacity gate; use dispatch='capacity' "
                         "or no gate noise with dispatch='dropless'")
    if drop_tokens:
        raise ValueError("drop_tokens=True drops routes over capacity, dispatch='dropless' computes them all; leave "
                         "drop_tokens unset (or False) or use dispatch='capacity'")
