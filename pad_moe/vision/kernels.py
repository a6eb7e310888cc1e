"""Three ways to convolve a batch with per-sample kernels; they agree up to float rounding.

- ``grouped``: aggregate one kernel per sample, then a single grouped convolution with the batch folded into the groups
  (input (1, B·C, H, W), weight (B·O, C/g, kh, kw), groups B·g). Cost: the convolution once, plus B·K·|W| to aggregate.
- ``mix``: convolve the whole batch with each of the K kernels, then mix the K outputs per sample by the coefficients.
  Only valid where the kernel is linear in the coefficients (PAD mixes its K per-kernel weights λs(1−M)⊙W_s + λd M⊙W_k:
  the softmax coefficients sum to one). Cost: K convolutions, no per-sample weights.
- ``bmm``: a 1×1 convolution (groups 1, no padding) as a batched matrix product of per-sample (O, C) matrices with the
  (C, H·W) input. Cost: the convolution once, plus the aggregation.

``pick_impl`` chooses one from the layer's shape, its output size and the device; layers accept ``impl=`` to force one
(benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMPLS = ("auto", "grouped", "mix", "bmm")


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding, dilation (pairs) and groups of a convolution."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def is_pointwise_dense(self) -> bool:
        """Whether a 1×1 kernel of this geometry is a plain matrix product per position (the ``bmm`` path)."""
        return self.groups == 1 and self.padding == (0, 0)


def conv_grouped(x_BCHW: torch.Tensor, w_BOIhw: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Per-sample kernels by one grouped convolution over the folded batch: (B, C, H, W) -> (B, O, H', W')."""
    B, C, H, W = x_BCHW.shape
    O = w_BOIhw.shape[1]
    y = F.conv2d(x_BCHW.reshape(1, B * C, H, W), w_BOIhw.reshape(B * O, *w_BOIhw.shape[2:]), None, geom.stride,
                 geom.padding, geom.dilation, geom.groups * B)  # (1, B·O, H', W')
    return y.reshape(B, O, y.shape[-2], y.shape[-1])


def conv_mix(x_BCHW: torch.Tensor, w_KOIhw: torch.Tensor, coef_BK: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Σ_k coef[b, k] · conv(x_b, W_k) by K convolutions in one call: (B, C, H, W) -> (B, O, H', W')."""
    K, O = w_KOIhw.shape[:2]
    g = geom.groups
    # Output channels of a grouped conv come in g blocks; put the K kernels inside each block so groups stay intact.
    w_all = w_KOIhw.reshape(K, g, O // g, *w_KOIhw.shape[2:]).transpose(0, 1).reshape(g * K * (O // g),
                                                                                      *w_KOIhw.shape[2:])
    y = F.conv2d(x_BCHW, w_all, None, geom.stride, geom.padding, geom.dilation, g)  # (B, g·K·O/g, H', W')
    B, _, Ho, Wo = y.shape
    y = y.reshape(B, g, K, O // g, Ho * Wo)
    out = torch.einsum("bgkop,bk->bgop", y, coef_BK.to(y.dtype))  # (B, g, O/g, H'·W')
    return out.reshape(B, O, Ho, Wo)


def conv_bmm(x_BCHW: torch.Tensor, w_BOI: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """A per-sample 1×1 convolution (groups 1, no padding) as a batched matmul: (B, C, H, W) -> (B, O, H', W')."""
    sh, sw = geom.stride
    if sh > 1 or sw > 1:
        x_BCHW = x_BCHW[:, :, ::sh, ::sw]
    B, C, H, W = x_BCHW.shape
    y = torch.bmm(w_BOI, x_BCHW.reshape(B, C, H * W))  # (B, O, H·W)
    return y.reshape(B, -1, H, W)


SMALL_OUTPUT = 16
"""Output positions H'·W' at or below which ``auto`` mixes K convolutions on CPU instead of building per-sample
kernels: there the B·K·|W| aggregation costs more than K-fold convolution (measured in docs/vision.md)."""


def pick_impl(requested: str, kernel_size: tuple[int, int], geom: ConvGeometry, device: torch.device,
              linear_in_coefficients: bool = True, positions: int | None = None) -> str:
    """The path a layer uses: ``requested`` unless 'auto'.

    auto: ``bmm`` for dense 1×1 kernels; on CPU ``mix`` for dense k×k kernels with at most SMALL_OUTPUT output
    ``positions`` H'·W' (late ResNet stages at small inputs); ``grouped`` otherwise (every other conv, and always on
    GPUs, where grouped convolutions are cheap; the GPU choice is not measured here).
    """
    if requested not in IMPLS:
        raise ValueError(f"impl={requested!r} is unknown; allowed: {', '.join(IMPLS)}")
    if requested != "auto":
        if requested == "bmm" and not (kernel_size == (1, 1) and geom.is_pointwise_dense):
            raise ValueError(f"impl='bmm' needs a 1x1 kernel with groups=1 and no padding, got kernel {kernel_size}, "
                             f"groups={geom.groups}, padding={geom.padding}")
        if requested == "mix" and not linear_in_coefficients:
            raise ValueError("impl='mix' is only valid for layers linear in their coefficients")
        return requested
    if kernel_size == (1, 1) and geom.is_pointwise_dense:
        return "bmm"
    small = positions is not None and positions <= SMALL_OUTPUT
    if device.type == "cpu" and geom.groups == 1 and linear_in_coefficients and small:
        return "mix"
    return "grouped"


def output_positions(height: int, width: int, kernel_size: tuple[int, int], geom: ConvGeometry) -> int:
    """H'·W' of a convolution's output."""
    sizes = []
    for size, k, s, p, d in zip((height, width), kernel_size, geom.stride, geom.padding, geom.dilation):
        sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return sizes[0] * sizes[1]
