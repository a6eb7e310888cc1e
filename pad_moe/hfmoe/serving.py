"""What a loaded compressed HF MoE holds in memory and runs per token (``load_deployed(DIR, resident=...)``).

The export stores, per sparse block, bit-packed masks, the static values and every expert's dynamic values
(``pad_moe.hfmoe.deployed``). Serving from that form as it is (``resident="compact"``) rebuilds every expert's weights
at every forward: the least memory, but each decoded token pays a rebuild of every expert of every layer (about 0.1x
the source's decode speed, BENCHMARKS.md). The other forms rebuild once, at load:

- ``full``: each block's experts become the family's own experts module again, holding the effective weights
  W_k = where(M, λd·W_k, λs·W_s): resident memory is the source's, speed is the source's (same module, same kernels).
- ``narrow`` (neuron granularity only): a hidden unit is static or dynamic in all three matrices at once, so the
  static units of a block are one narrow FFN shared by the experts and the dynamic units are narrow experts. Per
  token ``Σ_k g_k·FFN_k(x) = Σ_k g_k·FFN_k^dyn(x) + (Σ_k g_k)·FFN^static(x)``: the static FFN runs once per token,
  weighted by the token's routed gate mass, and the narrow experts run through the family's own experts module (the
  grouped GEMM its config selects). No weight is rebuilt per forward and the resident expert parameters are the
  stored ones (plus at most 7 zero units per expert, ``UNIT_ALIGN``); at κ=0.5 and top-2 a token costs 1.5 F
  instead of 2 F units of FFN work.
- ``auto`` (default): ``narrow`` for neuron granularity, ``full`` for element granularity.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

RESIDENT_FORMS = ("auto", "full", "narrow", "compact")
UNIT_ALIGN = 8
"""The narrow experts' width is padded with zero units to a multiple of this: the grouped GEMM (torch._grouped_mm,
the HF families' default experts kernel) needs 16-byte strides, 8 units in bf16. Resident memory is the stored
values plus at most 7 zero units per expert."""


def resolve_form(requested: str, granularity: str, folder, mask_sharing: str = "layer") -> str:
    if requested not in RESIDENT_FORMS:
        raise ValueError(f"resident={requested!r} is unknown; use one of {', '.join(RESIDENT_FORMS)}")
    if requested == "auto":
        return "narrow" if granularity == "neuron" and mask_sharing == "layer" else "full"
    if requested == "narrow" and mask_sharing != "layer":
        raise ValueError(f"resident='narrow' runs one static FFN per block, which needs layer-shared masks; {folder} "
                         "has per-expert masks (--mask-sharing expert): use resident='full' or 'compact'")
    if requested == "narrow" and granularity != "neuron":
        raise ValueError(f"resident='narrow' runs the static and dynamic hidden units apart, which needs neuron "
                         f"granularity; {folder} has {granularity} masks: use resident='full' or 'compact'")
    return requested


def _with_weights(template: nn.Module, gate_up: torch.Tensor, down: torch.Tensor, layout=None,
                  biases: dict | None = None) -> nn.Module:
    """A copy of the family's experts module ``template`` holding ``gate_up`` (E, 2F', H) and ``down`` (E, H, F')
    (canonical; written in the family's ``layout``, expert ``biases`` included)."""
    from pad_moe.hfmoe.families.layouts import layout_named

    layout = layout or layout_named("concatenated")
    params = dict(template._parameters)
    template._parameters = {k: v for k, v in params.items() if k not in layout.native_tensors}
    try:
        module = copy.deepcopy(template)  # without its (large, random) weights
    finally:
        template._parameters = params
    for name, tensor in layout.native(gate_up, down, biases or {}).items():
        setattr(module, name, nn.Parameter(tensor))
    module.intermediate_dim = down.shape[-1]
    return module


def full_experts(deployed, template: nn.Module) -> nn.Module:
    """The family's experts module with every expert's effective weights (rebuilt once)."""
    from pad_moe.hfmoe.families.layouts import BIAS_NAMES

    with torch.no_grad():
        gate_up, down = deployed.weights()
        biases = {n: p.detach().clone() for n, p in deployed.named_parameters(recurse=False) if n in BIAS_NAMES}
    return _with_weights(template, gate_up, down, deployed.layout, biases)


class NarrowPadExperts(nn.Module):
    """Neuron-granularity PAD experts of one block: a narrow static FFN (λs folded) and narrow dynamic experts."""

    def __init__(self, dynamic: nn.Module, static_gate_up, static_down, act_fn, num_experts: int):
        super().__init__()
        self.dynamic = dynamic  # the family's experts module over the dynamic units (None: every unit static)
        self.num_experts = num_experts
        self.act_fn = act_fn
        if static_gate_up is None:
            self.static_gate_up = self.static_down = None
        else:
            self.static_gate_up = nn.Parameter(static_gate_up.contiguous())  # (2 F_s, H)
            self.static_down = nn.Parameter(static_down.contiguous())  # (H, F_s)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if self.dynamic is not None:
            out = self.dynamic(hidden_states, top_k_index, top_k_weights)
        else:
            out = torch.zeros_like(hidden_states)
        if self.static_gate_up is not None:
            gate, up = nn.functional.linear(hidden_states, self.static_gate_up).chunk(2, dim=-1)
            static = nn.functional.linear(self.act_fn(gate) * up, self.static_down)
            routed = (top_k_index < self.num_experts).to(top_k_weights.dtype)  # index E marks a dropped slot
            mass = (top_k_weights * routed).sum(-1, keepdim=True)  # (S, 1): Σ_k g_k of the token's experts
            out = out + (static * mass).to(out.dtype)
        return out


def narrow_experts(deployed, template: nn.Module) -> NarrowPadExperts:
    """The narrow form of one block's neuron-granularity ``DeployedPadExperts`` (its masks' units are checked to
    agree across gate, up and down)."""
    from pad_moe.deploy.compact import unpack_bits

    if deployed.spec.get("mask_sharing", "layer") != "layer":
        raise ValueError("the narrow form needs layer-shared masks; this block has per-expert masks: use the full form")
    E, H, F = deployed.num_experts, deployed.hidden_dim, deployed.intermediate_dim
    masks = {part: unpack_bits(getattr(deployed, f"mask_{part}"), shape)
             for part, shape in (("gate", (F, H)), ("up", (F, H)), ("down", (H, F)))}
    units = masks["gate"][:, 0]
    expected = {"gate": units[:, None].expand(F, H), "up": units[:, None].expand(F, H),
                "down": units[None, :].expand(H, F)}
    if any(not torch.equal(masks[p], expected[p]) for p in masks):
        raise ValueError("the masks of a neuron-granularity block do not select whole hidden units (gate rows, up rows "
                         "and down columns must agree); the export was edited: write it again")
    n_dyn = int(units.sum())
    n_static = F - n_dyn
    with torch.no_grad():
        dyn_gate = deployed.dynamic_gate.reshape(E, n_dyn, H)
        dyn_up = deployed.dynamic_up.reshape(E, n_dyn, H)
        dyn_down = deployed.dynamic_down.reshape(E, H, n_dyn)
        dynamic = None
        if n_dyn:
            pad = -n_dyn % UNIT_ALIGN  # zero units: act(0)·0 = 0 and a zero down column add nothing
            if pad:
                dyn_gate, dyn_up = (torch.cat([w, w.new_zeros(E, pad, H)], dim=1) for w in (dyn_gate, dyn_up))
                dyn_down = torch.cat([dyn_down, dyn_down.new_zeros(E, H, pad)], dim=2)
            dynamic = _with_weights(template, torch.cat([dyn_gate, dyn_up], dim=1), dyn_down)
        static_gate_up = static_down = None
        if n_static and not deployed.spec["static_dropped"]:
            static_gate_up = torch.cat([deployed.static_gate.reshape(n_static, H),
                                        deployed.static_up.reshape(n_static, H)])
            static_down = deployed.static_down.reshape(H, n_static)
    return NarrowPadExperts(dynamic, static_gate_up, static_down, deployed.act_fn, E)
