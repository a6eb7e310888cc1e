"""PAD experts inside Hugging Face MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), with no DeepSpeed in the math.

transformers 5 stores a sparse block's experts as one module (``block.experts``): ``gate_up_proj`` (E, 2F, H) and
``down_proj`` (E, H, F), called as ``experts(hidden (S, H), top_k_index (S, k), top_k_weights (S, k))`` by the block,
whose router (``block.gate``) and shared expert (Qwen2-MoE) stay the model's own. ``PadHFExperts`` replaces that module:
the experts' weights as they were, a static weight W_s per weight, one mask per weight shared by the experts (gate,
up: (F, H), down: (H, F); neuron granularity: one entry per hidden unit) and φ; every expert computes with
W_eff = where(M, λd·W_k, λs·W_s). All masks one and φ = 0 give the original model exactly (tests/test_hf_moe.py).

W_s (``static_init``, a documented choice): ``mean`` (the experts' mean), ``frequency`` (their mean weighted by how
often the router picks each expert on calibration text; ``import_hf_moe(..., expert_frequency=...)``) or ``first``.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from pad_moe.moe.ffn import mix_stacked, scaled
from pad_moe.pad.protocol import PadMaskMixin

HF_MOE_FAMILIES = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts",
                   "olmoe": "num_experts"}
"""model_type -> the config attribute holding the number of routed experts."""
STATIC_INITS = ("mean", "frequency", "first")
MASKED = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def family_of(model_or_config) -> str:
    """The HF MoE family of a model or config; one line for a dense model or another family."""
    config = getattr(model_or_config, "config", model_or_config)
    family = getattr(config, "model_type", None)
    if family in HF_MOE_FAMILIES:
        return family
    if family is None:
        raise ValueError("not a Hugging Face model (its config has no model_type)")
    raise ValueError(f"model_type={family!r} is not an MoE family pad_moe imports ({', '.join(HF_MOE_FAMILIES)}); a "
                     "dense model is upcycled instead (pad_moe.upcycle)")


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, sparse block) of every block whose ``experts`` hold stacked gate_up_proj / down_proj and whose ``gate``
    is the router (weight (E, H))."""
    out = []
    for name, module in model.named_modules():
        experts, gate = getattr(module, "experts", None), getattr(module, "gate", None)
        if experts is None or gate is None or not isinstance(getattr(gate, "weight", None), torch.Tensor):
            continue
        if isinstance(experts, PadHFExperts) or (getattr(getattr(experts, "gate_up_proj", None), "ndim", 0) == 3
                                                 and getattr(getattr(experts, "down_proj", None), "ndim", 0) == 3):
            out.append((name, module))
    return out


class PadHFExperts(PadMaskMixin, nn.Module):
    """The experts of one HF sparse block as PAD experts (see the module doc)."""

    def __init__(self, experts: nn.Module, *, granularity: str = "element", scale_mode: str = "both",
                 static_init: str = "mean", frequency: Optional[torch.Tensor] = None):
        super().__init__()
        if static_init not in STATIC_INITS:
            raise ValueError(f"static_init={static_init!r} is unknown; allowed: {', '.join(STATIC_INITS)}")
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        E, F2, H = gate_up.shape
        if F2 % 2 or down.shape != (E, H, F2 // 2):
            raise ValueError(f"experts with gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are "
                             "not a (E, 2F, H) / (E, H, F) pair")
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, F2 // 2
        self.act_fn = experts.act_fn
        self.gate_up_proj = nn.Parameter(gate_up.clone())
        self.down_proj = nn.Parameter(down.clone())
        weights = _expert_weights(E, static_init, frequency)
        self.static_gate_up = nn.Parameter(_combine(gate_up, weights))
        self.static_down = nn.Parameter(_combine(down, weights))
        F = self.intermediate_dim
        self.init_pad({"gate_proj.weight": (F, H), "up_proj.weight": (F, H), "down_proj.weight": (H, F)},
                      granularity=granularity, scale_mode=scale_mode)
        self.mask_sharing = "layer"
        self.static_init = static_init

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (E, 2F, H), down (E, H, F)) under the current (or, while IMP scores, relaxed) masks."""
        lam_s, lam_d = self.scale_factors()
        masks = self.weight_masks()
        F = self.intermediate_dim
        s_gu, s_down = scaled(self.static_gate_up, lam_s), scaled(self.static_down, lam_s)
        gate = mix_stacked(s_gu[:F], self.gate_up_proj[:, :F], masks["gate_proj.weight"], lam_d)
        up = mix_stacked(s_gu[F:], self.gate_up_proj[:, F:], masks["up_proj.weight"], lam_d)
        down = mix_stacked(s_down, self.down_proj, masks["down_proj.weight"], lam_d)
        return torch.cat([gate, up], dim=1), down

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        gate_up, down = self.effective_weights()
        return run_experts(hidden_states, top_k_index, top_k_weights, gate_up, down, self.act_fn)

    def magnitude_scores(self) -> dict[str, torch.Tensor]:
        lam_s, lam_d = self.scale_factors()
        F = self.intermediate_dim
        with torch.no_grad():
            diff_gu = (lam_d * self.gate_up_proj - lam_s * self.static_gate_up).abs().sum(0)
            diff_down = (lam_d * self.down_proj - lam_s * self.static_down).abs().sum(0)
            per_weight = {"gate_proj.weight": diff_gu[:F], "up_proj.weight": diff_gu[F:],
                          "down_proj.weight": diff_down}
            return self.granularity.reduce(per_weight, self._weight_shapes)

    def stored_params(self) -> int:
        """Parameters a compact export stores: W_s where M=0 (none once the static part is dropped), every expert's
        W_k where M=1 (φ included)."""
        total = self.phi.numel() if isinstance(self.phi, torch.Tensor) else 0
        for name, mask in self.weight_masks().items():
            full = mask.expand(self._weight_shapes[name])
            dynamic = int(full.sum())
            total += dynamic * self.num_experts + (0 if self.static_dropped else full.numel() - dynamic)
        return total


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


def _expert_weights(E: int, static_init: str, frequency: Optional[torch.Tensor]) -> torch.Tensor:
    if static_init == "first":
        return torch.nn.functional.one_hot(torch.tensor(0), E).double()
    if static_init == "mean":
        return torch.full((E,), 1.0 / E, dtype=torch.float64)
    if frequency is None or frequency.shape != (E,) or float(frequency.sum()) <= 0:
        raise ValueError("static_init=frequency needs each layer's expert frequencies on calibration text (E positive "
                         "counts); pass expert_frequency or use static_init=mean")
    f = frequency.double()
    return f / f.sum()


def _combine(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.einsum("e,e...->...", weights, stacked.double()).to(stacked.dtype).contiguous()


def import_hf_moe(model: nn.Module, *, granularity: str = "element", scale_mode: str = "both",
                  static_init: str = "mean", expert_frequency: Optional[Mapping[str, torch.Tensor]] = None
                  ) -> nn.Module:
    """Swap the experts of every sparse block of an HF MoE model (in place) for ``PadHFExperts``, all masks one:
    the model then computes exactly what it did. ``expert_frequency``: block name -> (E,) router counts."""
    family_of(model)
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no sparse MoE block with stacked experts to import")
    for name, block in blocks:
        if isinstance(block.experts, PadHFExperts):
            raise ValueError(f"{name}.experts is already a PAD experts module; import a model once")
        frequency = None if expert_frequency is None else expert_frequency.get(name)
        block.experts = PadHFExperts(block.experts, granularity=granularity, scale_mode=scale_mode,
                                     static_init=static_init, frequency=frequency)
    return model


def router_frequencies(model: nn.Module, batches, forward) -> dict[str, torch.Tensor]:
    """Block name -> how often its router picked each expert over ``batches`` (``forward(model, batch)`` runs one),
    read from the top-k indices each block hands its experts."""
    counts: dict[str, torch.Tensor] = {}
    handles = []
    for name, block in moe_blocks(model):
        E = block.gate.weight.shape[0]
        counts[name] = torch.zeros(E, dtype=torch.long)

        def hook(_module, args, _name=name, _E=E):
            counts[_name] += torch.bincount(args[1].reshape(-1).cpu(), minlength=_E)

        handles.append(block.experts.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return counts
