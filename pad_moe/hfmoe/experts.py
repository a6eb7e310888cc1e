"""PAD experts inside Hugging Face MoE models (the registered families of ``pad_moe.hfmoe.families``: Mixtral,
Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, gpt-oss, GLM-4.5, Qwen3-Next, Llama 4 text), with no DeepSpeed in the math.

transformers 5 stores a sparse block's experts as one module (``block.experts``), for most families ``gate_up_proj``
(E, 2F, H) and ``down_proj`` (E, H, F), called as ``experts(hidden (S, H), top_k_index (S, k), top_k_weights (S, k))``
by the block, whose router (the family's ``router`` attribute) and shared experts stay the model's own; the family's
expert layout (``families.layouts``) converts other layouts (gpt-oss, Llama 4) to that canonical form and runs the
family's own expert computation on it. ``PadHFExperts`` replaces that module:
the experts' weights as they were, a static weight W_s per weight, one mask per weight shared by the experts (gate,
up: (F, H), down: (H, F); neuron granularity: one entry per hidden unit) and φ; every expert computes with
W_eff = where(M, λd·W_k, λs·W_s). All masks one and φ = 0 give the original model exactly (tests/test_hf_moe.py).

W_s (``static_init``, a documented choice): ``mean`` (the experts' mean), ``frequency`` (their mean weighted by how
often the router picks each expert on calibration text; ``import_hf_moe(..., expert_frequency=...)``), ``fisher``
(per entry, weighted by frequency × the diagonal Fisher of the calibration loss, D²-MoE; ``expert_fisher=...``,
``fisher_weights``) or ``first``.

Masks (``mask_sharing``): ``layer`` (one per weight, shared by the experts: the paper) or ``expert`` (one per expert and
weight, held by ``mask_holders[k]`` as ``e{k}.<weight>``: IMP's global threshold then gives rarely routed experts fewer
dynamic entries; W_s is stored wherever at least one expert is static).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from pad_moe.hfmoe.families import FamilyTable, family_spec, layout_named, lookup
from pad_moe.hfmoe.families.layouts import BIAS_NAMES
from pad_moe.moe.store import magnitude_per_weight, mix_grouped
from pad_moe.pad.protocol import PadMaskMixin

HF_MOE_FAMILIES = FamilyTable()
"""model_type -> the config key of its routed expert count: a live view of the registry (pad_moe.hfmoe.families)."""
STATIC_INITS = ("mean", "frequency", "fisher", "first")
MASK_SHARINGS = ("layer", "expert")
MASKED = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def family_of(model_or_config) -> str:
    """The HF MoE family of a model or config; one line for a dense model, a refused or an unknown family."""
    return family_spec(model_or_config).model_type


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, sparse block) of every block whose router (the family's, weight (E, H)) and ``experts`` (PAD experts or
    the family's expert layout) it holds; a model of no registered family: ``gate`` routers, concatenated experts."""
    spec = lookup(getattr(getattr(model, "config", None), "model_type", None))
    router, layout = (spec.router, spec.expert_layout) if spec is not None else ("gate", layout_named("concatenated"))
    out = []
    for name, module in model.named_modules():
        experts, gate = getattr(module, "experts", None), getattr(module, router, None)
        if experts is None or gate is None or not isinstance(getattr(gate, "weight", None), torch.Tensor):
            continue
        if isinstance(experts, PadHFExperts) or layout.matches(experts):
            out.append((name, module))
    return out


def block_router(model: nn.Module, block: nn.Module) -> nn.Module:
    """The router of one sparse block of ``model`` (its family's attribute)."""
    return getattr(block, family_spec(model).router)


class PadHFExperts(PadMaskMixin, nn.Module):
    """The experts of one HF sparse block as PAD experts (see the module doc)."""

    def __init__(self, experts: nn.Module, *, granularity: str = "element", scale_mode: str = "both",
                 static_init: str = "mean", frequency: Optional[torch.Tensor] = None,
                 fisher: Optional[Mapping[str, torch.Tensor]] = None, mask_sharing: str = "layer",
                 layout: str = "concatenated"):
        super().__init__()
        if static_init not in STATIC_INITS:
            raise ValueError(f"static_init={static_init!r} is unknown; allowed: {', '.join(STATIC_INITS)}")
        if mask_sharing not in MASK_SHARINGS:
            raise ValueError(f"mask_sharing={mask_sharing!r} is unknown; allowed: {', '.join(MASK_SHARINGS)}")
        self.layout = layout_named(layout)  # the family's expert layout (pad_moe.hfmoe.families.layouts)
        gate_up, down = self.layout.canonical(experts)
        E, F2, H = gate_up.shape
        if F2 % 2 or down.shape != (E, H, F2 // 2):
            raise ValueError(f"experts with gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are "
                             "not a (E, 2F, H) / (E, H, F) pair")
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, F2 // 2
        self.act_fn = self.layout.activation(experts)
        self.gate_up_proj = nn.Parameter(gate_up.clone())
        self.down_proj = nn.Parameter(down.clone())
        for bias_name, bias in self.layout.biases(experts).items():  # each expert's own, outside the partition
            setattr(self, bias_name, nn.Parameter(bias.clone()))
        fisher = fisher or {}
        self.static_gate_up = nn.Parameter(_combine(gate_up, _expert_weights(E, static_init, frequency,
                                                                             fisher.get("gate_up_proj"))))
        self.static_down = nn.Parameter(_combine(down, _expert_weights(E, static_init, frequency,
                                                                       fisher.get("down_proj"))))
        F = self.intermediate_dim
        holders = None
        if mask_sharing == "expert":  # expert k's masks live on mask_holders[k] (named e{k}.<weight> in masks())
            self.mask_holders = nn.ModuleList(nn.Module() for _ in range(E))
            holders = {f"e{k}.": holder for k, holder in enumerate(self.mask_holders)}
        self.init_pad({"gate_proj.weight": (F, H), "up_proj.weight": (F, H), "down_proj.weight": (H, F)},
                      granularity=granularity, scale_mode=scale_mode, holders=holders)
        self.mask_sharing = mask_sharing
        self.static_init = static_init

    def expert_masks(self) -> dict[str, torch.Tensor]:
        """Per weight, the masks the experts compute with (relaxed ones while IMP scores): layer-shared ones
        broadcastable to the weight, per-expert ones stacked (E, ...) and broadcastable to (E, out, in)."""
        if self.mask_sharing == "layer":
            return self.weight_masks()
        per_expert = [self.weight_masks(f"e{k}.") for k in range(self.num_experts)]
        return {name: torch.stack([m[name] for m in per_expert]) for name in MASKED}

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (E, 2F, H), down (E, H, F)) under the current (or, while IMP scores, relaxed) masks."""
        lam_s, lam_d = self.scale_factors()
        F = self.intermediate_dim
        static = {"gate_proj.weight": self.static_gate_up[:F], "up_proj.weight": self.static_gate_up[F:],
                  "down_proj.weight": self.static_down}
        grouped = {"gate_proj.weight": self.gate_up_proj[:, :F], "up_proj.weight": self.gate_up_proj[:, F:],
                   "down_proj.weight": self.down_proj}
        mixed = mix_grouped(static, grouped, self.expert_masks(), lam_s, lam_d)
        return torch.cat([mixed["gate_proj.weight"], mixed["up_proj.weight"]], dim=1), mixed["down_proj.weight"]

    def forward(self, hidden_states: torch.Tensor, *args):
        """The family's call: ``(hidden, top_k_index, top_k_weights)``; Llama 4: ``(routed_in,)``."""
        gate_up, down = self.effective_weights()
        return self.layout.run(self, hidden_states, args, gate_up, down)

    def magnitude_scores(self) -> dict[str, torch.Tensor]:
        lam_s, lam_d = self.scale_factors()
        F = self.intermediate_dim
        static = {"gate_proj.weight": self.static_gate_up[:F], "up_proj.weight": self.static_gate_up[F:],
                  "down_proj.weight": self.static_down}
        grouped = {"gate_proj.weight": self.gate_up_proj[:, :F], "up_proj.weight": self.gate_up_proj[:, F:],
                   "down_proj.weight": self.down_proj}
        per_expert = self.mask_sharing == "expert"
        diff = magnitude_per_weight(static, grouped, lam_s, lam_d, per_expert=per_expert)
        if not per_expert:
            return self.granularity.reduce(diff, self._weight_shapes)
        scores = {}
        for k in range(self.num_experts):
            reduced = self.granularity.reduce({n: d[k] for n, d in diff.items()}, self._weight_shapes)
            scores.update({f"e{k}.{name}": v for name, v in reduced.items()})
        return scores

    def stored_params(self) -> int:
        """Parameters a compact export stores: W_s where some expert is static (none once the static part is
        dropped), each expert's W_k where its mask is one. φ is not counted: λ is folded into the stored values
        (pad_moe.hfmoe.deployed)."""
        total = 0
        for name, mask in self.expert_masks().items():
            shape = self._weight_shapes[name]
            full = mask.expand(shape) if self.mask_sharing == "layer" else mask.expand(self.num_experts, *shape)
            dynamic = int(full.sum()) * (self.num_experts if self.mask_sharing == "layer" else 1)
            any_static = ~full.all(0) if self.mask_sharing == "expert" else ~full
            total += dynamic + (0 if self.static_dropped else int(any_static.sum()))
        return total + sum(p.numel() for n, p in self.named_parameters(recurse=False) if n in BIAS_NAMES)


def run_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, act_fn) -> torch.Tensor:
    """The HF experts' computation (tokens grouped per expert, weighted, summed back), for any stacked weights."""
    out = torch.zeros_like(x)
    E = gate_up.shape[0]
    with torch.no_grad():
        hit = torch.bincount(top_k_index.reshape(-1), minlength=E).nonzero().flatten().tolist()
    for e in hit:
        if e >= E:  # index E marks a dropped slot (some kernels pad with it), as in transformers
            continue
        slot, token = torch.where(top_k_index.T == e)  # slot-major, transformers' order (bitwise-equal results)
        g, u = nn.functional.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = nn.functional.linear(act_fn(g) * u, down[e]) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def _expert_weights(E: int, static_init: str, frequency: Optional[torch.Tensor],
                    fisher: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weights of the experts in W_s: (E,) for one weight per expert, (E, *weight shape) for per-entry weights
    (``fisher``: ``fisher_weights`` of the frequencies and the experts' squared gradients)."""
    if static_init == "fisher":
        if fisher is None:
            raise ValueError("static_init=fisher needs each layer's diagonal Fisher of its experts (squared gradients of "
                             "the calibration loss); pass expert_fisher or use static_init=frequency")
        return fisher_weights(_expert_weights(E, "frequency", frequency), fisher)
    if static_init == "first":
        return torch.nn.functional.one_hot(torch.tensor(0), E).double()
    if static_init == "mean":
        return torch.full((E,), 1.0 / E, dtype=torch.float64)
    if frequency is None or frequency.shape != (E,) or float(frequency.sum()) <= 0:
        raise ValueError("static_init=frequency needs each layer's expert frequencies on calibration text (E positive "
                         "counts); pass expert_frequency or use static_init=mean")
    f = frequency.double()
    return f / f.sum()


def fisher_weights(frequency: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """Per-entry weights of the experts in W_s (D²-MoE): at entry p expert k weighs freq_k·F_k[p] / Σ_j freq_j·F_j[p]
    (``frequency`` (E,) ≥ 0, ``fisher`` (E, ...) the mean squared gradients ≥ 0); where Σ_j freq_j·F_j[p] = 0 the
    weights are the frequencies normalised (the frequency-weighted mean). float64 (E, ...), summing to 1 per entry."""
    E = frequency.shape[0]
    if fisher.shape[0] != E or bool((fisher < 0).any()) or not bool(torch.isfinite(fisher).all()):
        raise ValueError(f"fisher of shape {tuple(fisher.shape)} must hold {E} experts' finite squared gradients")
    f = frequency.double() / frequency.double().sum()
    f = f.reshape(E, *([1] * (fisher.ndim - 1)))
    mass = f * fisher.double()  # (E, ...)
    total = mass.sum(0, keepdim=True)
    return torch.where(total > 0, mass / torch.where(total > 0, total, torch.ones_like(total)), f.expand_as(mass))


def _combine(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if weights.ndim > 1:  # per-entry weights (fisher)
        return (weights * stacked.double()).sum(0).to(stacked.dtype).contiguous()
    return torch.einsum("e,e...->...", weights, stacked.double()).to(stacked.dtype).contiguous()


def import_hf_moe(model: nn.Module, *, granularity: str = "element", scale_mode: str = "both",
                  static_init: str = "mean", expert_frequency: Optional[Mapping[str, torch.Tensor]] = None,
                  expert_fisher: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None,
                  mask_sharing: str = "layer") -> nn.Module:
    """Swap the experts of every sparse block of an HF MoE model (in place) for ``PadHFExperts``, all masks one:
    the model then computes exactly what it did. ``expert_frequency``: block name -> (E,) router counts;
    ``expert_fisher``: block name -> {"gate_up_proj": (E, 2F, H), "down_proj": (E, H, F)} mean squared gradients."""
    layout = family_spec(model).expert_layout
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no sparse MoE block with stacked experts to import")
    for name, block in blocks:
        if isinstance(block.experts, PadHFExperts):
            raise ValueError(f"{name}.experts is already a PAD experts module; import a model once")
        frequency = None if expert_frequency is None else expert_frequency.get(name)
        fisher = None if expert_fisher is None else expert_fisher.get(name)
        if fisher is not None:  # statistics of the family's own tensors, in its layout
            fisher = dict(zip(("gate_up_proj", "down_proj"),
                              layout.canonical_pair(fisher["gate_up_proj"], fisher["down_proj"])))
        block.experts = PadHFExperts(block.experts, granularity=granularity, scale_mode=scale_mode,
                                     static_init=static_init, frequency=frequency, fisher=fisher,
                                     mask_sharing=mask_sharing, layout=layout.name)
    return model


def router_frequencies(model: nn.Module, batches, forward) -> dict[str, torch.Tensor]:
    """Block name -> how often its router picked each expert over ``batches`` (``forward(model, batch)`` runs one),
    read from the top-k indices each block hands its experts."""
    counts: dict[str, torch.Tensor] = {}
    handles = []
    spec = family_spec(model)
    for name, block in moe_blocks(model):
        E = getattr(block, spec.router).weight.shape[0]
        counts[name] = torch.zeros(E, dtype=torch.long)

        def record(index, _name=name, _E=E):
            counts[_name] += torch.bincount(index.reshape(-1).cpu(), minlength=_E)

        handles.append(spec.expert_layout.choice_hook(block, spec.router, record))
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return counts
