"""Per-sample-kernel convolution without the per-sample kernels in memory: the CPU fast path of the dynamic convs.

    y_b = conv(x_b, Θ_b),   Θ_b = Σ_k coef[b, k] · scale ⊙ W_k  (+ coef[b, K] · extra_scale ⊙ extra)

DY-Conv / CondConv: scale = 1, no extra kernel. PAD: coef = [λd π, λs], scale = M, extra = W_s, extra_scale = 1 − M.

The reference (``kernels.conv_grouped``) builds all B kernels at once, B·|W| values, and autograd keeps them for the
backward: at ResNet-18's last stage 600 MB per conv at batch 64, in fresh pages every step (on this CPU the first touch
of a large allocation costs several times the arithmetic), streamed through memory several times, and convolved by a
grouped oneDNN convolution that slows down 4-13× where the output is small. ``PerSampleConv`` builds the kernels a tile
at a time (a chunk of samples × a block of output rows, at most TILE_BYTES) into a reused per-thread workspace,
convolves the tile, and in the backward rebuilds it and reduces its kernel gradients ∂Θ at once into ∂W_k, ∂coef and
∂(scales, extra); autograd saves only x, coef, W_k and the terms. So the kernels are built and consumed in cache, no
large tensor is allocated per step beyond the outputs and gradients a static conv also has (∂W_k: K of them), and PAD's
masks and λ are applied per tile (no masked copy of the K kernels per step).

Two engines convolve a tile (same numbers up to float rounding):
- ``grouped``: the chunk folded into the groups of one convolution (oneDNN; best where the output has many positions);
- ``gemm``: im2col (a view for unstrided 1×1 kernels) and one batched matrix product per tile (best where the kernels
  are large next to the output: late stages, 1×1 convs).
The selection rule is ``kernels.select_impl``; measurements in docs/vision.md.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

ENGINES = ("grouped", "gemm")

TILE_BYTES = 8 * 2**20
"""Upper bound on the per-sample kernels (and their gradients) alive at once: one tile of ``batch chunk × output
rows``. Small enough to stay in the last-level cache, so the kernels are built and consumed without a trip to DRAM;
W_k is read once per batch chunk. Measured on ResNet-18's last stages (docs/vision.md)."""

MIN_TILE_ROWS = 16
"""Output rows per tile below which the batch chunk shrinks instead (thinner products lose GEMM efficiency)."""

_aten = torch.ops.aten
_local = threading.local()


def workspace(slot: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A reused flat buffer of at least ``numel`` elements of ``like``'s dtype and device (one per thread and slot).

    Reuse is the point: a fresh large CPU allocation pays a page fault per page on first touch. Callers write it with
    ``out=`` ops and never let it escape (it is overwritten by the next call). Buffers made under inference_mode are
    inference tensors, which cannot be written outside it: they are kept apart."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    key = (slot, like.dtype, like.device, torch.is_inference_mode_enabled())
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]


def release_workspace() -> None:
    """Free this thread's workspace buffers (they are rebuilt on the next call)."""
    _local.buffers = {}


@dataclass(frozen=True)
class PerSampleSpec:
    """What ``PerSampleConv`` needs besides tensors: kernel shape (O, C/g, kh, kw), geometry, engine."""

    kernel_shape: tuple[int, int, int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    engine: str

    @property
    def numel(self) -> int:
        O, I, kh, kw = self.kernel_shape
        return O * I * kh * kw

    def tiles(self, batch: int, element_size: int) -> tuple[int, int]:
        """(samples per batch chunk, output rows per tile) with at most TILE_BYTES of per-sample kernels per tile.

        Whole kernels for the whole batch when they fit; otherwise (gemm engine, groups 1) tiles of output rows, at
        least MIN_TILE_ROWS of them, for as many samples as fit; the grouped engine tiles the batch only. Chunks and
        tiles are balanced (no ragged last one)."""
        O, I, kh, kw = self.kernel_shape
        row = I * kh * kw * element_size  # bytes of one output row of one sample's kernel
        if batch * O * row <= TILE_BYTES:
            return batch, O
        if self.engine != "gemm" or self.groups != 1:  # whole kernels, chunks of samples
            return _balanced(batch, TILE_BYTES // (O * row)), O
        chunk = _balanced(batch, TILE_BYTES // (min(O, MIN_TILE_ROWS) * row))
        return chunk, _balanced(O, TILE_BYTES // (chunk * row))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        _, _, kh, kw = self.kernel_shape
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                     zip((height, width), (kh, kw), self.stride, self.padding, self.dilation))

    @property
    def is_pointwise(self) -> bool:
        """A 1×1 kernel without padding: im2col is the (strided) input itself."""
        return self.kernel_shape[2:] == (1, 1) and self.padding == (0, 0) and self.dilation == (1, 1)


def _balanced(total: int, most: int) -> int:
    """The size of equal pieces (at most ``most``, at least 1) that cover ``total`` in the fewest pieces."""
    pieces = -(-total // max(1, min(total, most)))
    return -(-total // pieces)


def _columns(spec: PerSampleSpec, x_c: torch.Tensor) -> torch.Tensor:
    """im2col of a chunk: (c, C·kh·kw, L), F.unfold's layout, in the "columns" workspace (F.unfold itself is slower
    on CPU and allocates afresh); a view of the input for an unstrided 1×1 kernel."""
    c, C, H, W = x_c.shape
    if spec.is_pointwise and spec.stride == (1, 1):
        return x_c.reshape(c, C, H * W)
    _, _, kh, kw = spec.kernel_shape
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    Ho, Wo = spec.output_size(H, W)
    xp = F.pad(x_c, (pw, pw, ph, ph)) if ph or pw else x_c
    s0, s1, s2, s3 = xp.stride()
    patches = xp.as_strided((c, C, kh, kw, Ho, Wo), (s0, s1, dh * s2, dw * s3, sh * s2, sw * s3))
    cols = workspace("columns", c * C * kh * kw * Ho * Wo, x_c)
    return cols.view(patches.shape).copy_(patches).view(c, C * kh * kw, Ho * Wo)


def _uncolumns(spec: PerSampleSpec, cols_c: torch.Tensor, out_c: torch.Tensor) -> None:
    """The adjoint of ``_columns`` (col2im), written into ``out_c`` (c, C, H, W)."""
    c, C, H, W = out_c.shape
    if spec.is_pointwise:
        sh, sw = spec.stride
        if sh > 1 or sw > 1:
            out_c.zero_()
            out_c[:, :, ::sh, ::sw] = cols_c.reshape(c, C, *spec.output_size(H, W))
        else:
            out_c.copy_(cols_c.reshape(c, C, H, W))
        return
    out_c.copy_(F.fold(cols_c, (H, W), spec.kernel_shape[2:], spec.dilation, spec.padding, spec.stride))


def _grouped_conv(spec: PerSampleSpec, x_c, w_cN):
    O, I, kh, kw = spec.kernel_shape
    c, C, H, W = x_c.shape
    return F.conv2d(x_c.reshape(1, c * C, H, W), w_cN.view(c * O, I, kh, kw), None, spec.stride, spec.padding,
                    spec.dilation, spec.groups * c)


def _grouped_conv_backward(spec: PerSampleSpec, x_c, w_cN, gy_c, need_x: bool):
    O, I, kh, kw = spec.kernel_shape
    c, C, H, W = x_c.shape
    gx, gw, _ = _aten.convolution_backward(
        gy_c.reshape(1, c * O, *gy_c.shape[2:]), x_c.reshape(1, c * C, H, W), w_cN.view(c * O, I, kh, kw), None,
        list(spec.stride), list(spec.padding), list(spec.dilation), False, [0, 0], spec.groups * c,
        [need_x, True, False])
    return gx, gw.view(c, -1)


class _Terms:
    """Builds the per-sample kernels a tile of kernel entries n0:n1 at a time, and keeps that tile's terms for the
    reduction of its gradients (``_Grads``).

    Kernel of sample b: Σ_k coef[b, k]·scale ⊙ W_k (+ coef[b, K]·extra_scale ⊙ extra, when there is an extra kernel).
    ``rows`` (K or K+1, n1 − n0) stacks those kernels, and one GEMM coef @ rows builds the tile; in the backward one
    GEMM reduces the tile's gradients to R = coefᵀ ∂Θ. Without scales and extra kernel the rows are a view of W; else
    they are built in a workspace (once per call when a tile spans the whole kernel). Scales may be bool (a 0/1 mask:
    a quarter of the memory traffic of float ones, and exact)."""

    def __init__(self, w_KN, scale_N, extra_N, extra_scale_N, whole: bool):
        self.w, self.scale, self.extra, self.extra_scale = w_KN, scale_N, extra_N, extra_scale_N
        self.K = w_KN.shape[0]
        self.plain = scale_N is None and extra_N is None
        self._whole = self._tile(0, w_KN.shape[1], "kernel_rows") if whole else None
        self.current = None

    def _tile(self, n0: int, n1: int, slot: str):
        w = self.w[:, n0:n1]
        if self.plain:
            return n0, n1, w
        rows = workspace(slot, (self.K + (self.extra is not None)) * (n1 - n0), w).view(-1, n1 - n0)
        _scaled(w, self.scale, n0, n1, rows[:self.K])
        if self.extra is not None:
            _scaled(self.extra[n0:n1], self.extra_scale, n0, n1, rows[self.K])
        return n0, n1, rows

    def build(self, coef_c: torch.Tensor, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        """The tile's per-sample kernels (c, n1 − n0), written into ``out``."""
        self.current = self._whole if self._whole is not None else self._tile(n0, n1, "kernel_tile_rows")
        return torch.mm(coef_c, self.current[2], out=out)


def _scaled(values, scale, n0, n1, out):
    return out.copy_(values) if scale is None else torch.mul(values, scale[n0:n1], out=out)


class PerSampleConv(torch.autograd.Function):
    """(x (B, C, H, W), coef (B, K[+1]), W (K, N), scale, extra, extra_scale (N,) or None, spec) -> (B, O, H', W').

    Kernel of sample b: Σ_k coef[b, k]·scale ⊙ W_k + coef[b, K]·extra_scale ⊙ extra (a missing scale is 1; without
    extra, coef has K columns). Loops over tiles (a chunk of samples × a block of output rows, ``PerSampleSpec.tiles``);
    a tile's kernels live in a reused workspace and are rebuilt in the backward."""

    @staticmethod
    def forward(ctx, x, coef, w_KN, scale_N, extra_N, extra_scale_N, spec: PerSampleSpec):
        B, C, H, W = x.shape
        O, I, kh, kw = spec.kernel_shape
        J = I * kh * kw  # one output row of one kernel
        g = spec.groups
        x = x.contiguous()
        y = x.new_empty(B, O, *spec.output_size(H, W))
        chunk, rows = spec.tiles(B, x.element_size())
        terms = _Terms(w_KN, scale_N, extra_N, extra_scale_N, whole=rows == O)
        kernels = workspace("kernels", chunk * rows * J, w_KN)
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            c, x_c, coef_c = b1 - b0, x[b0:b1], coef[b0:b1]
            if spec.engine == "grouped":
                w_cN = terms.build(coef_c, 0, spec.numel, kernels[:c * spec.numel].view(c, -1))
                y[b0:b1] = _grouped_conv(spec, x_c, w_cN).view(c, O, *y.shape[2:])
                continue
            cols = _columns(spec, x_c).reshape(c * g, J, -1)  # (c·g, J, L)
            y_c = y[b0:b1].view(c, O, -1)
            for o0 in range(0, O, rows):
                o1 = min(O, o0 + rows)
                w_tile = terms.build(coef_c, o0 * J, o1 * J, kernels[:c * (o1 - o0) * J].view(c, -1))
                # groups > 1 never tiles rows (o0 = 0, o1 = O): split the chunk's kernels and outputs by group
                out = y_c[:, o0:o1].view(c * g, -1, cols.shape[-1]) if g > 1 else y_c[:, o0:o1]
                torch.bmm(w_tile.view(c * g, (o1 - o0) // g, J), cols, out=out)
        ctx.save_for_backward(x, coef, w_KN, scale_N, extra_N, extra_scale_N)
        ctx.spec = spec
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, coef, w_KN, scale_N, extra_N, extra_scale_N = ctx.saved_tensors
        spec: PerSampleSpec = ctx.spec
        need = ctx.needs_input_grad
        B, C, H, W = x.shape
        O, I, kh, kw = spec.kernel_shape
        J = I * kh * kw
        g = spec.groups
        gy = gy.contiguous()
        grads = _Grads(*(torch.empty_like(t) if n else None
                         for t, n in zip((w_KN, scale_N, extra_N, extra_scale_N), need[2:6])))
        gx = torch.empty_like(x) if need[0] else None
        gcoef = torch.zeros_like(coef) if need[1] else None
        chunk, rows = spec.tiles(B, x.element_size())
        terms = _Terms(w_KN, scale_N, extra_N, extra_scale_N, whole=rows == O)
        kernels = workspace("kernels", chunk * rows * J, w_KN)
        kernel_grads = workspace("kernel_grads", chunk * rows * J, w_KN)
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            c, x_c, coef_c = b1 - b0, x[b0:b1], coef[b0:b1]
            first = b0 == 0
            gcoef_c = None if gcoef is None else gcoef[b0:b1]
            if spec.engine == "grouped":
                w_cN = terms.build(coef_c, 0, spec.numel, kernels[:c * spec.numel].view(c, -1))
                gx_c, gw_cN = _grouped_conv_backward(spec, x_c, w_cN, gy[b0:b1], gx is not None)
                if gx is not None:
                    gx[b0:b1] = gx_c.view(c, C, H, W)
                grads.reduce(gw_cN, coef_c, terms, first, gcoef_c)
                continue
            cols = _columns(spec, x_c).reshape(c * g, J, -1)
            gy_c = gy[b0:b1].reshape(c, O, -1)
            gcols = workspace("columns_grad", cols.numel(), cols).view(cols.shape) if gx is not None else None
            for o0 in range(0, O, rows):
                o1 = min(O, o0 + rows)
                t = o1 - o0
                w_tile = terms.build(coef_c, o0 * J, o1 * J, kernels[:c * t * J].view(c, -1))
                gy_t = gy_c[:, o0:o1].reshape(c * g, t // g, -1)
                if gcols is not None:  # ∂cols = Σ over row tiles of W_tileᵀ ∂y_tile
                    w_t = w_tile.view(c * g, t // g, J).transpose(1, 2)
                    torch.bmm(w_t, gy_t, out=gcols) if o0 == 0 else gcols.baddbmm_(w_t, gy_t)
                gw_tile = torch.bmm(gy_t, cols.transpose(1, 2), out=kernel_grads[:c * t * J].view(c * g, t // g, J))
                grads.reduce(gw_tile.view(c, -1), coef_c, terms, first, gcoef_c)
            if gcols is not None:
                _uncolumns(spec, gcols.view(c, C * kh * kw, -1), gx[b0:b1])
        return gx, gcoef, grads.w, grads.scale, grads.extra, grads.extra_scale, None


class _Grads:
    """∂W, ∂scale, ∂extra, ∂extra_scale, filled tile by tile from the tiles' kernel gradients ∂Θ (c, n1 − n0):

        R = coefᵀ ∂Θ (K[+1], ·),  ∂W = scale ⊙ R[:K],  ∂scale = Σ_k W_k ⊙ R_k,
        ∂extra = extra_scale ⊙ R[K],  ∂extra_scale = extra ⊙ R[K],  ∂coef = ∂Θ · rowsᵀ.
    """

    def __init__(self, w, scale, extra, extra_scale):
        self.w, self.scale, self.extra, self.extra_scale = w, scale, extra, extra_scale

    def reduce(self, gw_cM, coef_c, terms: _Terms, first: bool, gcoef_c):
        n0, n1, rows = terms.current
        K = terms.K
        if terms.plain:  # R is ∂W itself
            if self.w is not None:
                out = self.w[:, n0:n1]
                torch.mm(coef_c.t(), gw_cM, out=out) if first else out.addmm_(coef_c.t(), gw_cM)
        elif any(t is not None for t in (self.w, self.scale, self.extra, self.extra_scale)):
            r = torch.mm(coef_c.t(), gw_cM, out=workspace("reduced", rows.numel(), gw_cM).view(rows.shape))
            if terms.extra is not None:
                self._add(self.extra, n0, n1, r[K] if terms.extra_scale is None else r[K] * terms.extra_scale[n0:n1],
                          first)
                if self.extra_scale is not None:
                    self._add(self.extra_scale, n0, n1, r[K] * terms.extra[n0:n1], first)
            if self.w is not None:
                out = self.w[:, n0:n1]
                if terms.scale is None:
                    out.copy_(r[:K]) if first else out.add_(r[:K])
                else:
                    torch.mul(r[:K], terms.scale[n0:n1], out=out) if first else out.addcmul_(r[:K], terms.scale[n0:n1])
            if self.scale is not None:
                self._add(self.scale, n0, n1, r[:K].mul_(terms.w[:, n0:n1]).sum(0), first)
        if gcoef_c is not None:
            gcoef_c.addmm_(gw_cM, rows.t())

    @staticmethod
    def _add(grad, n0, n1, value, first):
        if grad is not None:
            grad[n0:n1].copy_(value) if first else grad[n0:n1].add_(value)


def conv_per_sample(x_BCHW: torch.Tensor, coef: torch.Tensor, w_KN: torch.Tensor, scale_N: torch.Tensor | None,
                    extra_N: torch.Tensor | None, extra_scale_N: torch.Tensor | None,
                    spec: PerSampleSpec) -> torch.Tensor:
    """y_b = conv(x_b, Σ_k coef[b, k]·scale ⊙ W_k + coef[b, K]·extra_scale ⊙ extra) by ``PerSampleConv``:
    (B, C, H, W) -> (B, O, H', W'). Missing scales are 1; without ``extra``, coef has K columns."""
    if spec.engine not in ENGINES:
        raise ValueError(f"engine={spec.engine!r} is unknown; allowed: {', '.join(ENGINES)}")
    K = w_KN.shape[0] + (extra_N is not None)
    if coef.shape[1] != K or w_KN.shape[1] != spec.numel:
        raise ValueError(f"coef {tuple(coef.shape)} and W {tuple(w_KN.shape)} do not match {K} kernels of "
                         f"{spec.numel} entries")
    return PerSampleConv.apply(x_BCHW, coef, w_KN, scale_N, extra_N, extra_scale_N, spec)
