"""How a family stores and runs its routed experts, converted to and from the canonical form PAD works on.

Canonical (what ``PadHFExperts`` holds and masks): ``gate_up`` (E, 2F, H) — the F gate rows, then the F up rows — and
``down`` (E, H, F); expert biases, where a family has them, as ``gate_up_bias`` (E, 2F) in the same order and
``down_bias`` (E, H). A layout converts the family's experts module to that form at import, runs the family's own
expert computation on the (effective) canonical weights, and writes them back into the family's module
(``native``, the deployed ``full`` serving form).

- ``concatenated``: transformers' default (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4.5, Qwen3-Next): the
  canonical form itself; ``experts(hidden, top_k_index, top_k_weights)``, ``act(gate) * up``.
- ``gpt_oss``: ``gate_up_proj`` (E, H, 2F) with gate and up interleaved (columns 0, 2, .. gate; 1, 3, .. up), their
  bias (E, 2F) alike, ``down_proj`` (E, F, H) and its bias (E, H); the clamped SwiGLU
  ``(clamp(up, ±limit) + 1) · g · σ(α g)``, g = ``clamp(gate, max=limit)``.
- ``llama4``: ``gate_up_proj`` (E, H, 2F) (gate then up along the last axis), ``down_proj`` (E, F, H); every expert runs
  on every token's copy, pre-scaled by its router score (0 for an unpicked expert): ``experts(routed_in (E·S, H))``.

Biases stay each expert's own (outside the partition: never masked, stored per expert in the export, trained with the
experts when healing), so κ=1 is exact and neuron and element granularity treat them alike.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

BIAS_NAMES = ("gate_up_bias", "down_bias")


def _act_name(act_fn) -> str:
    from transformers.activations import ACT2CLS

    for name, cls in ACT2CLS.items():
        if type(act_fn) is (cls[0] if isinstance(cls, tuple) else cls):
            return name
    raise ValueError(f"the experts' activation {type(act_fn).__name__} has no transformers ACT2FN name")


def _is_tensor3(x) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 3


def _loop(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, E: int,
          expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """transformers' eager experts loop: the tokens of each picked expert (slot-major), weighted, summed back."""
    out = torch.zeros_like(x)
    with torch.no_grad():
        hit = torch.bincount(top_k_index.reshape(-1), minlength=E).nonzero().flatten().tolist()
    for e in hit:
        if e >= E:  # index E marks a dropped slot (some kernels pad with it), as in transformers
            continue
        slot, token = torch.where(top_k_index.T == e)
        y = expert(e, x[token]) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


class ExpertLayout:
    """The concatenated layout (see the module doc); subclasses override what differs."""

    name = "concatenated"
    has_bias = False
    narrow = True  # the deployed narrow form (one static FFN + narrow experts, output-weighted) computes the same
    native_tensors = ("gate_up_proj", "down_proj")

    def matches(self, experts: nn.Module) -> bool:
        gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        return _is_tensor3(gate_up) and _is_tensor3(down)

    def sizes(self, experts: nn.Module) -> tuple[int, int, int]:
        """(E, F, H) of the family's experts module."""
        E, F2, H = experts.gate_up_proj.shape
        return E, F2 // 2, H

    def canonical(self, experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (E, 2F, H), down (E, H, F)) of the family's experts module, detached."""
        return self.canonical_pair(experts.gate_up_proj.detach(), experts.down_proj.detach())

    def canonical_pair(self, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Any pair of tensors shaped as the family's ``gate_up_proj`` / ``down_proj`` (weights, or per-entry
        statistics of them such as the Fisher) in the canonical layout."""
        return gate_up, down

    def biases(self, experts: nn.Module) -> dict[str, torch.Tensor]:
        return {}

    def activation(self, experts: nn.Module) -> nn.Module:
        return experts.act_fn

    def export_spec(self, act_fn) -> dict:
        """The activation as JSON fields of a deployed block's spec (no ``layout`` field: the format's default)."""
        return {"act": _act_name(act_fn)}

    def activation_from_spec(self, spec: dict) -> nn.Module:
        from transformers.activations import ACT2FN

        return ACT2FN[spec["act"]]

    def spec_problem(self, spec: dict) -> Optional[tuple[str, object, str]]:
        """(field, value, expected) of the first bad activation field of a deployed spec, or None."""
        from transformers.activations import ACT2FN

        act = spec.get("act")
        return None if isinstance(act, str) and act in ACT2FN else ("act", act, "a transformers activation name")

    def run(self, module: nn.Module, hidden_states: torch.Tensor, args: tuple, gate_up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
        """The family's expert computation with the canonical weights; ``args``: what the block passes after the
        hidden states; ``module`` holds ``act_fn`` (and the biases, for a layout with them)."""
        from pad_moe.hfmoe.experts import run_experts

        return run_experts(hidden_states, args[0], args[1], gate_up, down, module.act_fn)

    def native(self, gate_up: torch.Tensor, down: torch.Tensor, biases: dict) -> dict[str, torch.Tensor]:
        """The family module's tensors holding these canonical weights (contiguous)."""
        return {"gate_up_proj": gate_up.contiguous(), "down_proj": down.contiguous()}

    def choice_hook(self, block: nn.Module, router: str, record: Callable[[torch.Tensor], None]):
        """Call ``record(top_k_index)`` at every forward of ``block``; returns the hook handle."""
        return block.experts.register_forward_pre_hook(lambda _m, args: record(args[1]))


class ClampedSwiGLU(nn.Module):
    """gpt-oss' activation: ``(clamp(up, -limit, limit) + 1) · g · σ(α·g)``, ``g = clamp(gate, max=limit)``."""

    def __init__(self, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


def _interleave(gate: torch.Tensor, up: torch.Tensor, dim: int) -> torch.Tensor:
    """gate_0, up_0, gate_1, up_1, ... along ``dim``."""
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


class GptOssLayout(ExpertLayout):
    name = "gpt_oss"
    has_bias = True
    narrow = False  # per-expert biases inside the activation: a static unit is not one FFN shared by the experts
    native_tensors = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")

    def matches(self, experts: nn.Module) -> bool:
        return super().matches(experts) and isinstance(getattr(experts, "gate_up_proj_bias", None), torch.Tensor)

    def sizes(self, experts):
        E, H, F2 = experts.gate_up_proj.shape
        return E, F2 // 2, H

    def canonical_pair(self, gate_up, down):  # (E, H, 2F) interleaved, (E, F, H)
        gate_up = torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=-1).transpose(1, 2).contiguous()
        return gate_up, down.transpose(1, 2).contiguous()

    def biases(self, experts):
        b = experts.gate_up_proj_bias.detach()
        return {"gate_up_bias": torch.cat([b[:, 0::2], b[:, 1::2]], dim=-1).contiguous(),
                "down_bias": experts.down_proj_bias.detach().clone()}

    def activation(self, experts):
        return ClampedSwiGLU(experts.alpha, experts.limit)

    def export_spec(self, act_fn):
        return {"layout": self.name, "act": "clamped_swiglu", "swiglu_alpha": act_fn.alpha,
                "swiglu_limit": act_fn.limit}

    def activation_from_spec(self, spec):
        return ClampedSwiGLU(spec["swiglu_alpha"], spec["swiglu_limit"])

    def spec_problem(self, spec):
        if spec.get("act") != "clamped_swiglu":
            return "act", spec.get("act"), "clamped_swiglu"
        for key in ("swiglu_alpha", "swiglu_limit"):
            value = spec.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                return key, value, "a positive number"
        return None

    def native(self, gate_up, down, biases):
        F = gate_up.shape[1] // 2
        out = {"gate_up_proj": _interleave(gate_up[:, :F], gate_up[:, F:], 1).transpose(1, 2).contiguous(),
               "down_proj": down.transpose(1, 2).contiguous()}
        b = biases["gate_up_bias"]
        out["gate_up_proj_bias"] = _interleave(b[:, :F], b[:, F:], 1).contiguous()
        out["down_proj_bias"] = biases["down_bias"].contiguous()
        return out

    def run(self, module, hidden_states, args, gate_up, down):
        w = self.native(gate_up, down, {name: getattr(module, name) for name in BIAS_NAMES})
        act = module.act_fn

        def expert(e, x):  # transformers' order of operations: matmul, then the bias
            h = x @ w["gate_up_proj"][e] + w["gate_up_proj_bias"][e]
            return act(h[..., ::2], h[..., 1::2]) @ w["down_proj"][e] + w["down_proj_bias"][e]

        return _loop(hidden_states, args[0], args[1], gate_up.shape[0], expert)


class Llama4Layout(ExpertLayout):
    name = "llama4"
    narrow = False  # inputs are scaled by the router score before the experts: no output-weighted static FFN

    def matches(self, experts):
        return super().matches(experts) and hasattr(experts, "expert_dim")

    def sizes(self, experts):
        E, H, F2 = experts.gate_up_proj.shape
        return E, F2 // 2, H

    def canonical_pair(self, gate_up, down):  # (E, H, 2F), (E, F, H)
        return gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()

    def export_spec(self, act_fn):
        return {"layout": self.name, **super().export_spec(act_fn)}

    def native(self, gate_up, down, biases):
        return {"gate_up_proj": gate_up.transpose(1, 2).contiguous(), "down_proj": down.transpose(1, 2).contiguous()}

    def run(self, module, hidden_states, args, gate_up, down):
        w = self.native(gate_up, down, {})
        E, H = gate_up.shape[0], gate_up.shape[2]
        h = torch.bmm(hidden_states.view(E, -1, H), w["gate_up_proj"])
        gate, up = h.chunk(2, dim=-1)
        return torch.bmm(up * module.act_fn(gate), w["down_proj"]).view(-1, H)

    def choice_hook(self, block, router, record):
        k = getattr(block, router).top_k

        def hook(_module, _args, output):  # (scores, logits): the router's own top-k of its logits
            record(torch.topk(output[1], k, dim=1).indices)

        return getattr(block, router).register_forward_hook(hook)


LAYOUTS = {layout.name: layout for layout in (ExpertLayout(), GptOssLayout(), Llama4Layout())}


def layout_named(name: str) -> ExpertLayout:
    if name not in LAYOUTS:
        raise ValueError(f"expert layout {name!r} is unknown; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]
