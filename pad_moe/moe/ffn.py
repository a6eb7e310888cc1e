"""FFN building blocks: activations, the dense FFN in two expert types, ``mlp`` (down(act(fc1 x)), two matrices) and
``glu`` (gated: down(act(gate x) * up x), three matrices), and the PAD mix of grouped expert weights (``mix_stacked``)
that every PAD experts path computes with (pad_moe's MoE layers, AutoEP, HF MoE import).
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


EXPERT_TYPES = ("mlp", "glu")
"""mlp: act(x W1ᵀ) W2ᵀ (BERT, T5 v1.0); glu: (act(x Wgᵀ) ⊙ x Wuᵀ) Wdᵀ (Llama, Mistral, Qwen, T5 v1.1, Switch-XXL)."""

GLU_ACTIVATIONS = {"silu": "SwiGLU", "swish": "SwiGLU", "gelu": "GEGLU", "gelu_tanh": "GEGLU",
                   "gelu_new": "GEGLU"}
"""The activations a glu expert takes, with the name of the variant they make (GEGLU with exact or tanh GELU)."""


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_expert_type(expert_type: str, activation: str) -> None:
    """ValueError naming the value when ``expert_type`` is unknown or ``activation`` does not fit it."""
    if expert_type not in EXPERT_TYPES:
        raise ValueError(f"expert_type={expert_type!r} is unknown; allowed: {', '.join(EXPERT_TYPES)}")
    get_activation(activation)
    if expert_type == "glu" and activation not in GLU_ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not a gated activation for expert_type='glu'; allowed: "
                         + ", ".join(f"{a} ({v})" for a, v in GLU_ACTIVATIONS.items()))


def ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
        act) -> torch.Tensor:
    """act(x W1ᵀ + b1) W2ᵀ + b2 with nn.Linear layouts: w1 (F, H), w2 (H, F)."""
    return F.linear(act(F.linear(x, w1, b1)), w2, b2)


def glu_ffn(x: torch.Tensor, wg: torch.Tensor, bg: torch.Tensor | None, wu: torch.Tensor, bu: torch.Tensor | None,
            wd: torch.Tensor, bd: torch.Tensor | None, act) -> torch.Tensor:
    """(act(x Wgᵀ + bg) ⊙ (x Wuᵀ + bu)) Wdᵀ + bd with nn.Linear layouts: wg, wu (F, H), wd (H, F)."""
    return F.linear(act(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


def init_linear_(linear: nn.Linear, generator: torch.Generator | None = None) -> None:
    """nn.Linear's default initialisation, drawn from ``generator`` (so expert i is reproducible from its id)."""
    bound = 1 / math.sqrt(linear.in_features)
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=generator)
        if linear.bias is not None:
            linear.bias.uniform_(-bound, bound, generator=generator)


class FFN(nn.Module):
    """A dense two-layer FFN: the static model, and the expert of a plain (fully dynamic) MoE."""

    expert_type = "mlp"
    linear_names = ("fc1", "fc2")
    """The nn.Linear children, inputs first and the output projection last."""

    def __init__(self, hidden_size: int, ffn_size: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        check_expert_type(self.expert_type, activation)
        self.activation = activation
        self._act = get_activation(activation)
        self.fc1 = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.fc2 = nn.Linear(ffn_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self._act)

    def compute(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """This FFN's function with weights ``w`` (name -> tensor, as ``named_parameters``; biases optional)."""
        return ffn(x, w["fc1.weight"], w.get("fc1.bias"), w["fc2.weight"], w.get("fc2.bias"), self._act)

    def scaled_forward(self, x: torch.Tensor, scale) -> torch.Tensor:
        """The FFN with every weight and bias multiplied by ``scale`` (λs of a compacted PAD layer's static units)."""
        return scale * self.fc2(self._act(scale * self.fc1(x)))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for name in self.linear_names:
            init_linear_(getattr(self, name), generator)


class GatedFFN(FFN):
    """A dense gated FFN (GLU): down(act(gate(x)) ⊙ up(x)); SwiGLU with silu, GEGLU with gelu / gelu_tanh."""

    expert_type = "glu"
    linear_names = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, hidden_size: int, ffn_size: int, activation: str = "silu", bias: bool = False):
        nn.Module.__init__(self)
        check_expert_type(self.expert_type, activation)
        self.activation = activation
        self._act = get_activation(activation)
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x, dict(self.named_parameters()))

    def compute(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        return glu_ffn(x, w["gate_proj.weight"], w.get("gate_proj.bias"), w["up_proj.weight"], w.get("up_proj.bias"),
                       w["down_proj.weight"], w.get("down_proj.bias"), self._act)

    def scaled_forward(self, x: torch.Tensor, scale) -> torch.Tensor:
        return scale * self.down_proj(self._act(scale * self.gate_proj(x)) * (scale * self.up_proj(x)))


FFN_CLASSES = {"mlp": FFN, "glu": GatedFFN}


def make_ffn(expert_type: str, hidden_size: int, ffn_size: int, activation: str, bias: bool = True) -> FFN:
    """The dense FFN of ``expert_type`` ('mlp' or 'glu')."""
    check_expert_type(expert_type, activation)
    return FFN_CLASSES[expert_type](hidden_size, ffn_size, activation, bias)


class _PadMix(torch.autograd.Function):
    """W_eff = S0 + (λd·M) ⊙ W_k for a 0/1 mask M: the PAD mix of one expert weight in one fused pass.

    With S0 = λs·W_s zeroed where M this equals where(M, λd·W_k, λs·W_s) (x + 0 = x and 1·λd·w = λd·w exactly).
    Gradients: ∂W_k = λd·(M ⊙ g), zero where M=0; ∂S0 = g (the masking of S0 applies M once per layer to the sum over
    experts); ∂λd = Σ M ⊙ g ⊙ W_k, a contraction without a product tensor.
    """

    @staticmethod
    def forward(ctx, s0, w_dyn, mask_f, lam_mask, lam_d):
        is_tensor = isinstance(lam_d, torch.Tensor)
        ctx.save_for_backward(w_dyn, mask_f, lam_d if is_tensor else None)
        ctx.lam_d = None if is_tensor else lam_d
        ctx.s0_shape = s0.shape  # (out, in) against stacked experts (E, out, in): S0's gradient sums over experts
        return torch.addcmul(s0, lam_mask, w_dyn)

    @staticmethod
    def backward(ctx, grad):
        w_dyn, mask_f, lam_d_t = ctx.saved_tensors
        lam_d = lam_d_t if lam_d_t is not None else ctx.lam_d
        grad_w = grad_lam = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[4]:
            masked = grad * mask_f  # M ⊙ g in the weight's shape
            if ctx.needs_input_grad[4]:
                grad_lam = _dot(masked, w_dyn).reshape(lam_d_t.shape).to(lam_d_t.dtype)
            if ctx.needs_input_grad[1]:
                grad_w = masked if _is_one(lam_d) else masked.mul_(lam_d)
        grad_s0 = None
        if ctx.needs_input_grad[0]:
            grad_s0 = grad if grad.shape == ctx.s0_shape else grad.sum_to_size(ctx.s0_shape)
        return grad_s0, grad_w, None, None, grad_lam


class _Scale(torch.autograd.Function):
    """λd·W with ∂λd = Σ g ⊙ W as a contraction (no product tensor for the gradient of λd)."""

    @staticmethod
    def forward(ctx, w, lam_d):
        ctx.save_for_backward(w, lam_d)
        return w * lam_d

    @staticmethod
    def backward(ctx, grad):
        w, lam_d = ctx.saved_tensors
        grad_w = grad * lam_d if ctx.needs_input_grad[0] else None
        grad_lam = _dot(grad, w).reshape(lam_d.shape).to(lam_d.dtype) if ctx.needs_input_grad[1] else None
        return grad_w, grad_lam


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a ⊙ b over all entries of two same-shape tensors, without materialising the product (einsum is both faster
    and more accurate than torch.dot here)."""
    return torch.einsum("i,i->", a.reshape(-1), b.reshape(-1))


def _is_one(value) -> bool:
    return not isinstance(value, torch.Tensor) and value == 1.0


def scaled(w: torch.Tensor, lam_d) -> torch.Tensor:
    """λd·W, with the gradient of λd as a contraction; W itself when λd is the constant 1."""
    return _scaled(w, lam_d)


def mix_stacked(static: torch.Tensor, w_dyn: torch.Tensor, mask: torch.Tensor, lam_d) -> torch.Tensor:
    """The PAD mix of all experts at once: ``static`` = λs·W_s (out, in), ``w_dyn`` stacked (E, out, in), ``mask``
    shared (broadcastable to W_s) or per expert (E, ...). Bool masks take the fused ``_PadMix`` (exact zero gradient
    where static); IMP's relaxed masks the differentiable reference formula."""
    if mask.dtype != torch.bool:
        # W_s expanded over the experts: ∂M = Σ_e g_e⊙(λd·W_e) − Σ_e g_e⊙(λs·W_s), two sums of the same shape, so an
        # expert equal to the static weight (upcycled) scores exactly 0, as one expert at a time would
        return pad_mix(static.expand_as(w_dyn), w_dyn, mask, 1.0, lam_d)
    with torch.no_grad():
        mask_f = mask.to(static.dtype)
        lam = lam_d.detach() if isinstance(lam_d, torch.Tensor) else lam_d
        lam_mask = mask_f if _is_one(lam) else (mask_f * lam).to(static.dtype)
        keep_static = 1 - mask_f
    return _PadMix.apply(static * keep_static, w_dyn, mask_f, lam_mask, lam_d)


def _scaled(w: torch.Tensor, lam_d) -> torch.Tensor:
    if _is_one(lam_d):
        return w
    if isinstance(lam_d, torch.Tensor) and lam_d.requires_grad:
        return _Scale.apply(w, lam_d)
    return lam_d * w
