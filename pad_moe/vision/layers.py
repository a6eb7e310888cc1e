"""Convolutions with input-dependent kernels: DY-Conv, CondConv and PAD-DyConv.

    DY-Conv   W(x) = Σ_k π_k(x) W_k,  π = softmax(FC2(ReLU(FC1(GAP(x)))) / τ)          (Chen et al. 2020, K = 4)
    CondConv  W(x) = Σ_e r_e(x) W_e,  r = sigmoid(FC(GAP(x)))                          (Yang et al. 2019, E = 8)
    PAD       W(x) = λs (1 − M) ⊙ W_s + λd M ⊙ Σ_k π_k(x) W_k                          (PAD-Net Eq. 4)

One mask M per PAD conv, of the shape of one kernel, shared by the K kernels. Masks, φ and the IMP protocol come from
``PadMaskMixin``; the formula from ``pad_mix``. No conv bias: every conv of the models here is followed by BatchNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from pad_moe.pad.mixing import pad_mix
from pad_moe.pad.protocol import PadMaskMixin
from pad_moe.vision.kernels import (
    FAST_IMPLS,
    ConvGeometry,
    conv_bmm,
    conv_grouped,
    conv_mix,
    output_positions,
    select_impl,
)
from pad_moe.vision.persample import PerSampleSpec, conv_per_sample


class KernelAttention(nn.Module):
    """π(x) = softmax(FC2(ReLU(FC1(GAP(x)))) / τ): (B, C, H, W) -> (B, K). FC1 has no bias, FC2 has one."""

    def __init__(self, in_channels: int, num_kernels: int, reduction: int = 4, temperature: float = 30.0):
        super().__init__()
        hidden = max(1, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, num_kernels)
        self.temperature = float(temperature)
        """Softmax temperature τ; a plain attribute driven by ``TemperatureSchedule`` (not saved in state_dict)."""

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        z_BK = self.fc2(F.relu(self.fc1(x_BCHW.mean((2, 3)))))
        return torch.softmax(z_BK / self.temperature, dim=-1)


class SigmoidRouter(nn.Module):
    """CondConv routing r(x) = sigmoid(FC(GAP(x))): (B, C, H, W) -> (B, E)."""

    def __init__(self, in_channels: int, num_experts: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_experts)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x_BCHW.mean((2, 3))))


class KernelMixtureConv2d(nn.Module):
    """A conv whose kernel is Σ_k c_k(x) W_k for per-sample coefficients c (B, K); subclasses define ``routing``."""

    linear_in_coefficients = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, num_kernels: int = 4, impl: str = "auto"):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                             f"groups={groups}")
        if num_kernels < 1:
            raise ValueError(f"num_kernels={num_kernels} must be >= 1")
        self.in_channels, self.out_channels, self.num_kernels = in_channels, out_channels, num_kernels
        self.kernel_size = _pair(kernel_size)
        self.geometry = ConvGeometry(_pair(stride), _pair(padding), _pair(dilation), groups)
        select_impl(impl, self.kernel_shape, self.geometry, torch.device("cpu"), self.linear_in_coefficients)  # validate
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(num_kernels, *self.kernel_shape))  # (K, O, C/g, kh, kw)
        self.reset_kernels(self.weight)

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """Shape of one kernel (O, C/g, kh, kw)."""
        return (self.out_channels, self.in_channels // self.geometry.groups, *self.kernel_size)

    def reset_kernels(self, weight: torch.Tensor, mode: str = "fan_in") -> None:
        """Initialise kernels independently like nn.Conv2d (fan_in, uniform) or Kaiming normal (fan_out, ResNet)."""
        O, I, kh, kw = self.kernel_shape
        with torch.no_grad():
            if mode == "fan_in":
                weight.uniform_(-1 / math.sqrt(I * kh * kw), 1 / math.sqrt(I * kh * kw))
            else:
                weight.normal_(0, math.sqrt(2.0 / (O * kh * kw)))

    def routing(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Per-sample kernel coefficients (B, K): softmax attention (DY-Conv) or sigmoid routing (CondConv)."""
        raise TypeError(f"{type(self).__name__} is a base class: use DynamicConv2d, CondConv2d or PadDynamicConv2d")

    def resolved_impl(self, x_BCHW: torch.Tensor) -> str:
        positions = output_positions(x_BCHW.shape[-2], x_BCHW.shape[-1], self.kernel_size, self.geometry)
        return select_impl(self.impl, self.kernel_shape, self.geometry, x_BCHW.device, self.linear_in_coefficients,
                           positions)

    # -- kernels; PAD overrides these three --------------------------------------------------------------------------
    def mix_kernels(self, coef_BK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernels (K', O, C/g, kh, kw), coefficients (B, K')) whose mix of convolutions is the layer's output."""
        return self.weight, coef_BK

    def per_sample_kernels(self, coef_BK: torch.Tensor) -> torch.Tensor:
        """One kernel per sample: (B, O, C/g, kh, kw)."""
        K = self.num_kernels
        w_BN = coef_BK.to(self.weight.dtype) @ self.weight.reshape(K, -1)  # (B, K) @ (K, N) -> (B, N)
        return w_BN.reshape(coef_BK.shape[0], *self.kernel_shape)

    def kernel_terms(self, coef_BK: torch.Tensor) -> tuple:
        """The per-sample kernels in the form the fast paths take (``pad_moe.vision.persample.conv_per_sample``):
        (coef (B, K[+1]), W (K, N), scale, extra, extra_scale (N,) or None). Here Θ_b = Σ_k coef[b, k] W_k."""
        return coef_BK.to(self.weight.dtype), self.weight.reshape(self.num_kernels, -1), None, None, None

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        coef_BK = self.routing(x_BCHW)
        impl = self.resolved_impl(x_BCHW)
        if impl in FAST_IMPLS:
            g = self.geometry
            spec = PerSampleSpec(self.kernel_shape, g.stride, g.padding, g.dilation, g.groups, FAST_IMPLS[impl])
            return conv_per_sample(x_BCHW, *self.kernel_terms(coef_BK), spec)
        if impl == "mix":
            kernels, coefs = self.mix_kernels(coef_BK)
            return conv_mix(x_BCHW, kernels, coefs, self.geometry)
        w_BOIhw = self.per_sample_kernels(coef_BK)
        if impl == "bmm":
            return conv_bmm(x_BCHW, w_BOIhw[..., 0, 0], self.geometry)
        return conv_grouped(x_BCHW, w_BOIhw, self.geometry)

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={g.stride}, "
                f"padding={g.padding}, groups={g.groups}, num_kernels={self.num_kernels}, impl={self.impl}")


class DynamicConv2d(KernelMixtureConv2d):
    """DY-Conv: K kernels mixed by a softmax attention with temperature (annealed 30 -> 1 during training)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, num_kernels: int = 4, reduction: int = 4, temperature: float = 30.0,
                 impl: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, num_kernels, impl)
        self.attention = KernelAttention(in_channels, num_kernels, reduction, temperature)

    def routing(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.attention(x_BCHW)


class CondConv2d(KernelMixtureConv2d):
    """CondConv: E experts mixed by independent sigmoid routing weights."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, num_experts: int = 8, impl: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, num_experts, impl)
        self.router = SigmoidRouter(in_channels, num_experts)

    def routing(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.router(x_BCHW)


class MergeStaticDynamic(torch.autograd.Function):
    """Per-sample kernels from a shared static part and per-sample dynamic entries: out[b] = static; out[b, index] =
    dynamic[b]. (N,), (B, D), (D,) -> (B, N).

    Its backward reads the (B, N) gradient once (a sum over samples) instead of copying it as ``scatter``'s does.
    """

    @staticmethod
    def forward(ctx, static_N, dynamic_BD, index_D):
        B = dynamic_BD.shape[0]
        out_BN = static_N.expand(B, -1).clone()
        out_BN.scatter_(1, index_D.expand(B, -1), dynamic_BD)  # faster than out[:, index] = ... on CPU
        ctx.save_for_backward(index_D)
        return out_BN

    @staticmethod
    def backward(ctx, grad_BN):
        (index_D,) = ctx.saved_tensors
        grad_static = grad_BN.sum(0).index_fill_(0, index_D, 0) if ctx.needs_input_grad[0] else None
        grad_dynamic = grad_BN.index_select(1, index_D) if ctx.needs_input_grad[1] else None
        return grad_static, grad_dynamic, None


class FoldStatic(torch.autograd.Function):
    """PAD's K kernels with the static part folded in, for a 0/1 mask: out_k = λs(1−M)⊙W_s + λd M⊙W_k.
    (N,), (K, N), (N,) bool, λs, λd (tensors) -> (K, N).

    Its backward makes three passes over the K·N gradient (the sum over kernels, ∂W_k, one fused dot for ∂λd) where
    autograd's broadcasting products make six and allocate two K·N temporaries per step (the fold is ~6 % of a
    ResNet-18 training step)."""

    @staticmethod
    def forward(ctx, static_N, weight_KN, mask_N, lam_s, lam_d):
        keep = mask_N.to(weight_KN.dtype)
        drop = 1 - keep
        ctx.save_for_backward(static_N, weight_KN, keep, drop, lam_s, lam_d)
        return torch.addcmul((lam_s * static_N) * drop, lam_d * keep, weight_KN)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_KN):
        static_N, weight_KN, keep, drop, lam_s, lam_d = ctx.saved_tensors
        need_static, need_weight, _, need_lam_s, need_lam_d = ctx.needs_input_grad
        grad_N = grad_KN.sum(0)
        g_static = (lam_s * drop) * grad_N if need_static else None
        g_lam_s = torch.dot(grad_N, static_N * drop).reshape(lam_s.shape) if need_lam_s else None
        g_weight = g_lam_d = None
        if need_weight or need_lam_d:
            g_weight = grad_KN * (lam_d * keep)  # exactly zero where M = 0
        if need_lam_d:  # Σ M ⊙ G ⊙ W = <∂W, W> / λd; λd near 0 (the unconstrained mode only) takes the direct sum
            g_lam_d = (torch.dot(g_weight.reshape(-1), weight_KN.reshape(-1)) / lam_d if float(lam_d.abs()) > 1e-3
                       else (grad_KN * keep * weight_KN).sum()).reshape(lam_d.shape)
        return g_static, g_weight if need_weight else None, None, g_lam_s, g_lam_d


SPARSE_MERGE_MAX_RATIO = 0.2
"""PAD per-sample kernels aggregate only the dynamic entries and scatter them into the static part up to this dynamic
ratio; above it a dense GEMM with the masked kernels is faster on CPU (measured, B = 64, C = 64…512: the scatter and
gather cost more than the K·(1−ρ)·|W| multiply-adds they save)."""


class PadDynamicConv2d(PadMaskMixin, DynamicConv2d):
    """PAD-DyConv: W(x) = λs (1 − M) ⊙ W_s + λd M ⊙ Σ_k π_k(x) W_k, one mask (a kernel's shape) shared by the K kernels.

    Masks start all dynamic (M = 1): with λs = λd = 1 the layer equals DynamicConv2d; with M = 0 it is a static conv
    with kernel λs·W_s. With a bool mask the per-sample kernels aggregate only the dynamic entries (B·K·ρ|W| instead of
    B·K·|W|); a relaxed (real-valued) mask, used while IMP scores, takes the dense formula.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, num_kernels: int = 4, reduction: int = 4, temperature: float = 30.0,
                 impl: str = "auto", scale_mode: str = "both"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, num_kernels,
                         reduction, temperature, impl)
        self.static_weight = nn.Parameter(torch.empty(self.kernel_shape))  # (O, C/g, kh, kw)
        self.reset_kernels(self.static_weight)
        self.init_pad({"weight": self.kernel_shape}, granularity="element", scale_mode=scale_mode)
        self._dynamic_index_cache: tuple | None = None
        self._mask_pair_cache: tuple | None = None

    def _mask(self) -> torch.Tensor:
        return self.weight_masks()["weight"]  # (O, C/g, kh, kw), bool or relaxed float

    def _dynamic_index(self, mask: torch.Tensor) -> torch.Tensor:
        """Flat indices of M = 1 entries (n_dyn,), cached until the mask buffer changes (set_masks, load_state_dict)."""
        key = _cache_key(mask)
        if self._dynamic_index_cache is None or self._dynamic_index_cache[0] != key:
            self._dynamic_index_cache = (key, mask.reshape(-1).nonzero().squeeze(1))
        return self._dynamic_index_cache[1]

    def _mask_pair(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, 1 − M) flat (N,): a bool mask's pair cached like ``_dynamic_index`` and kept bool (the fast path
        multiplies by it exactly, reading a byte per entry); a relaxed mask's in the kernels' dtype on every call (it
        carries the gradient IMP reads)."""
        if mask.dtype != torch.bool:
            mask_f = mask.to(self.weight.dtype).reshape(-1)
            return mask_f, 1 - mask_f
        key = _cache_key(mask)
        if self._mask_pair_cache is None or self._mask_pair_cache[0] != key:
            flat = mask.reshape(-1)
            self._mask_pair_cache = (key, (flat, ~flat))
        return self._mask_pair_cache[1]

    def _on_masks_changed(self) -> None:
        self._dynamic_index_cache = None
        self._mask_pair_cache = None

    def mix_kernels(self, coef_BK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K per-kernel PAD weights λs(1−M)⊙W_s + λd M⊙W_k, mixed by π: (K, O, C/g, kh, kw), (B, K).

        Exact because the softmax attention sums to one: Σ_k π_k (S + D_k) = S + Σ_k π_k D_k. So the static part costs
        no extra convolution; gradients w.r.t. the attention logits are unchanged (softmax ignores a shift shared by
        all kernels).
        """
        lam_s, lam_d = self.scale_factors()
        mask = self._mask()
        if mask.dtype != torch.bool or mask.is_meta:
            return pad_mix(self.static_weight, self.weight, mask, lam_s, lam_d), coef_BK
        # pad_mix's values with products by a 0/1 mask (x·1 = x, x·0 = 0), where CPU torch.where costs several passes
        # over the K kernels
        K, w = self.num_kernels, self.weight
        lam_s, lam_d = (torch.as_tensor(v, dtype=w.dtype, device=w.device) for v in (lam_s, lam_d))
        kernels = FoldStatic.apply(self.static_weight.reshape(-1), w.reshape(K, -1), mask.reshape(-1), lam_s, lam_d)
        return kernels.reshape(K, *self.kernel_shape), coef_BK

    fold_static = True
    """Fast paths: fold the static part into the K kernels once per step (``mix_kernels``: K terms per per-sample
    kernel, DY-Conv's cost) instead of carrying it as a (K+1)-th term with masks applied per tile (a ResNet-18
    training step at κ=0.1: 5.05 -> 4.70 s CPU, DY-Conv 4.44 s; docs/vision.md)."""

    def kernel_terms(self, coef_BK: torch.Tensor) -> tuple:
        """Folded (``fold_static``): Θ_b = Σ_k π_bk (λs(1−M)⊙W_s + λd M⊙W_k), exact because the attention sums to one
        (``mix_kernels``); the K folded kernels cost one K·N pass per step, and a 0/1 mask multiplies exactly, so W_k
        at M = 0 and W_s at M = 1 get exactly zero gradient.

        Unfolded: Θ_b = Σ_k (λd π_bk)·M ⊙ W_k + λs·(1−M) ⊙ W_s: coefficients [λd π, λs] (B, K+1), W, scale M, extra
        kernel W_s with scale 1 − M; for a bool or a relaxed mask alike. The fast path applies the masks and λ a tile
        at a time, so no N- or K·N-sized tensor is built per step (a bool mask's 0/1 copies are cached)."""
        mask = self._mask()
        # an all-static layer stays unfolded: there M = 0 multiplies the attention out exactly, where the fold leaves
        # it a rounding-noise gradient (~1e-9) that Adam would scale up to full-size steps
        if self.fold_static and (mask.dtype != torch.bool or self._dynamic_index(mask).numel()):
            kernels, coef = self.mix_kernels(coef_BK)
            return coef.to(kernels.dtype), kernels.reshape(self.num_kernels, -1), None, None, None
        lam_s, lam_d = self.scale_factors()
        mask_f, static_f = self._mask_pair(mask)
        coef = coef_BK.to(self.weight.dtype)
        lam_s = torch.as_tensor(lam_s, dtype=coef.dtype, device=coef.device).reshape(1, 1).expand(coef.shape[0], 1)
        coef = torch.cat([lam_d * coef, lam_s], 1)
        return coef, self.weight.reshape(self.num_kernels, -1), mask_f, self.static_weight.reshape(-1), static_f

    def _static_part(self, mask_f: torch.Tensor, lam_s) -> torch.Tensor:
        """λs·(1 − M)⊙W_s for a 0/1 float mask: (O, C/g, kh, kw)."""
        return (lam_s * self.static_weight) * (1 - mask_f)

    def per_sample_kernels(self, coef_BK: torch.Tensor) -> torch.Tensor:
        lam_s, lam_d = self.scale_factors()
        mask = self._mask()
        B, K = coef_BK.shape
        coef_BK = coef_BK.to(self.weight.dtype)
        if mask.dtype != torch.bool or mask.is_meta:  # relaxed mask (IMP scoring) or shape-only: the dense formula
            w_dyn_BN = coef_BK @ self.weight.reshape(K, -1)  # (B, N)
            w_dyn = w_dyn_BN.reshape(B, *self.kernel_shape)
            return pad_mix(self.static_weight, w_dyn, mask, lam_s, lam_d)  # (B, O, C/g, kh, kw)
        mask_f = mask.to(self.static_weight.dtype)
        static_N = self._static_part(mask_f, lam_s).reshape(-1)  # (N,)
        index = self._dynamic_index(mask)  # (n_dyn,)
        if index.numel() > SPARSE_MERGE_MAX_RATIO * mask.numel():
            # many dynamic entries: fold the mask into the K kernels and let one GEMM add the static part as its bias
            dyn_KN = (lam_d * mask_f).reshape(1, -1) * self.weight.reshape(K, -1)  # (K, N), zero where M = 0
            return torch.addmm(static_N, coef_BK, dyn_KN).reshape(B, *self.kernel_shape)
        dyn_KD = lam_d * self.weight.reshape(K, -1).index_select(1, index)  # (K, n_dyn): λd folded in, not (B, n_dyn)
        w_BN = MergeStaticDynamic.apply(static_N, coef_BK @ dyn_KD, index)  # (B, K) @ (K, n_dyn) -> (B, N)
        return w_BN.reshape(B, *self.kernel_shape)

    def magnitude_scores(self) -> dict[str, torch.Tensor]:
        """|λd·W_k − λs·W_s| summed over the K kernels, per mask entry."""
        lam_s, lam_d = self.scale_factors()
        with torch.no_grad():
            return {"weight": (lam_d * self.weight - lam_s * self.static_weight).abs().sum(0)}


def _cache_key(mask: torch.Tensor) -> tuple:
    """When a tensor derived from the mask buffer must be rebuilt: the buffer replaced or written in place, or the
    inference mode changed (tensors made under inference_mode cannot be saved for a backward)."""
    return mask.data_ptr(), mask._version, mask.device, torch.is_inference_mode_enabled()


DYNAMIC_LAYERS = (DynamicConv2d, CondConv2d, PadDynamicConv2d)


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set τ of every DY-Conv / PAD attention in ``model``; returns how many were set."""
    n = 0
    for module in model.modules():
        if isinstance(module, KernelAttention):
            module.temperature = float(temperature)
            n += 1
    return n
