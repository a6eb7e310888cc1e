"""Ways to convolve a batch with per-sample kernels; they agree up to float rounding.

The reference paths (the formula as written; what ``impl="reference"`` and every non-CPU device run):

- ``grouped``: aggregate one kernel per sample, then a single grouped convolution with the batch folded into the groups
  (input (1, B·C, H, W), weight (B·O, C/g, kh, kw), groups B·g). Cost: the convolution once, plus B·K·|W| to aggregate.
- ``mix``: convolve the whole batch with each of the K kernels, then mix the K outputs per sample by the coefficients.
  Only valid where the kernel is linear in the coefficients (PAD mixes its K per-kernel weights λs(1−M)⊙W_s + λd M⊙W_k:
  the softmax coefficients sum to one). Cost: K convolutions, no per-sample weights.
- ``bmm``: a 1×1 convolution (groups 1, no padding) as a batched matrix product of per-sample (O, C) matrices with the
  (C, H·W) input. Cost: the convolution once, plus the aggregation.

The CPU fast paths (``pad_moe.vision.persample``: kernels built a tile at a time in a reused workspace, never held
for the backward):

- ``chunked``: the grouped convolution above, a chunk of samples at a time.
- ``tiled``: im2col and batched matrix products, a tile (samples × output rows) at a time.

``pick_impl`` is the reference rule; ``select_impl`` (what the layers call) applies the fast rule on CPU. Layers accept
``impl=`` to force one (tests, benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMPLS = ("auto", "reference", "grouped", "mix", "bmm", "chunked", "tiled")
FAST_IMPLS = {"chunked": "grouped", "tiled": "gemm"}
"""The fast paths and the ``pad_moe.vision.persample`` engine each one convolves a tile with."""


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

    auto (the reference rule; ``select_impl`` replaces it on CPU): ``bmm`` for dense 1×1 kernels; on CPU ``mix`` for
    dense k×k kernels with at most SMALL_OUTPUT output ``positions`` H'·W'; ``grouped`` otherwise (every other conv,
    and always on GPUs, where cuDNN's grouped convolutions and the caching allocator make the per-sample kernels cheap).
    """
    if requested not in IMPLS:
        raise ValueError(f"impl={requested!r} is unknown; allowed: {', '.join(IMPLS)}")
    if requested == "reference":
        requested = "auto"
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


TILED_BELOW = 256
"""CPU ``auto``: dense k×k convolutions with fewer output positions H'·W' than this take ``tiled``, the others
``chunked``. Where the output is small the kernels are large next to the activations: oneDNN's grouped convolution
slows down there (4-13× a static conv at ResNet-18's 8×8 and 4×4 stages), im2col + GEMM does not (docs/vision.md)."""


def select_impl(requested: str, kernel_shape: tuple[int, int, int, int], geom: ConvGeometry, device: torch.device,
                linear_in_coefficients: bool = True, positions: int | None = None) -> str:
    """The path a layer runs: ``requested`` unless 'auto'; 'reference' is ``pick_impl``'s rule.

    auto on CPU (with the output size known): ``grouped`` for depthwise kernels (C/g = 1: their per-sample kernels
    are tiny, the batch folded into the groups is one depthwise convolution); ``tiled`` for dense 1×1 kernels and for
    k×k kernels with fewer than TILED_BELOW output positions; ``chunked`` for the other convolutions. Elsewhere (CUDA,
    the meta device) the reference rule: ``bmm`` for dense 1×1 kernels, ``grouped`` otherwise.
    """
    kernel_size = tuple(kernel_shape[2:])
    if requested != "auto" or device.type != "cpu" or positions is None:
        return pick_impl(requested, kernel_size, geom, device, linear_in_coefficients, positions)
    if geom.groups > 1 and kernel_shape[1] == 1:
        return "grouped"
    if kernel_size == (1, 1) and geom.is_pointwise_dense:
        return "tiled"
    return "tiled" if geom.groups == 1 and positions < TILED_BELOW else "chunked"
