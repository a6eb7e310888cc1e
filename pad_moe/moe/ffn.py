"""FFN building blocks: activations, the dense FFN, the plain MoE expert and the PAD expert.

Experts see DeepSpeed's dispatched tokens, shape (ep_size, 1, capacity, hidden) including zero-padded slots, and act on
the last dimension only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pad_moe.pad.mixing import pad_mix

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
        act) -> torch.Tensor:
    """act(x W1ᵀ + b1) W2ᵀ + b2 with nn.Linear layouts: w1 (F, H), w2 (H, F)."""
    return F.linear(act(F.linear(x, w1, b1)), w2, b2)


def init_linear_(linear: nn.Linear, generator: torch.Generator | None = None) -> None:
    """nn.Linear's default initialisation, drawn from ``generator`` (so expert i is reproducible from its id)."""
    bound = 1 / math.sqrt(linear.in_features)
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=generator)
        if linear.bias is not None:
            linear.bias.uniform_(-bound, bound, generator=generator)


class FFN(nn.Module):
    """A dense two-layer FFN: the static model, and the expert of a plain (fully dynamic) MoE."""

    def __init__(self, hidden_size: int, ffn_size: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.activation = activation
        self._act = get_activation(activation)
        self.fc1 = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.fc2 = nn.Linear(ffn_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self._act)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_linear_(self.fc1, generator)
        init_linear_(self.fc2, generator)


class PadContext:
    """What the PAD experts of a layer need for one forward, computed once per forward by the owning layer.

    ``static`` holds λs·W_static per weight name, ``lam_d`` the dynamic scale factor, ``masks_for(expert)`` the
    per-weight masks of an expert (the same dict for all experts when the layer shares one mask).
    """

    __slots__ = ("static", "lam_d", "masks_for")

    def __init__(self, static: dict, lam_d, masks_for):
        self.static, self.lam_d, self.masks_for = static, lam_d, masks_for


class PadExpert(FFN):
    """An expert of a PAD-MoE layer: its own FFN weights are the dynamic part W_k.

    Effective weights are W_k_eff = λs(1−M)⊙W_s + λd M⊙W_k. The static part and the shared mask are owned by the layer
    (registered once, outside DeepSpeed's experts) and handed over for the duration of one forward through
    ``pad_context``, a plain attribute: never a registered submodule, so DeepSpeed neither deep-copies nor tags it.
    """

    def __init__(self, hidden_size: int, ffn_size: int, activation: str = "gelu", bias: bool = True):
        super().__init__(hidden_size, ffn_size, activation, bias)
        self.pad_context: PadContext | None = None

    def effective_weights(self) -> dict[str, torch.Tensor]:
        ctx = self.pad_context
        if ctx is None:
            raise RuntimeError("PadExpert is run by its PadMoE layer; call the layer, not the expert")
        own = dict(self.named_parameters())
        if ctx.static is None:  # compacted layer: experts hold only dynamic units
            return {name: ctx.lam_d * w for name, w in own.items()}
        masks = ctx.masks_for(self)
        # λs is already folded into ctx.static, so the static side is multiplied by 1.
        return {name: pad_mix(ctx.static[name], own[name], masks[name], 1.0, ctx.lam_d) for name in ctx.static}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weights()
        return ffn(x, w["fc1.weight"], w.get("fc1.bias"), w["fc2.weight"], w.get("fc2.bias"), self._act)
