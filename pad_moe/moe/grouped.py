"""One linear map per expert over tokens sorted by expert: ``y[rows of e] = x[rows of e] @ W[e]ᵀ``.

``grouped_linear(x, w, counts)`` takes ``w`` stacked as ``(E, out, in)`` (nn.Linear layout) and the row count of each
expert. It runs ``torch._grouped_mm`` (one kernel for all experts; CPU and CUDA in torch ≥ 2.8) when the dtype and the
16-byte stride rule allow it, a loop of matmuls otherwise. ``backend()`` says which one a given input takes.
"""

from __future__ import annotations

import torch

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def backend(x: torch.Tensor, w: torch.Tensor) -> str:
    """``grouped_mm`` when torch's grouped GEMM takes these operands, else ``loop``."""
    if not _HAS_GROUPED_MM or x.dtype not in GROUPED_MM_DTYPES or w.dtype != x.dtype:
        return "loop"
    if 0 in w.shape[1:] or not x.shape[0]:  # no rows: torch's grouped GEMM refuses the empty gradient's strides
        return "loop"
    align = 16 // x.element_size()  # every row of every operand must start on a 16-byte boundary
    if w.shape[1] % align or w.shape[2] % align:
        return "loop"
    return "grouped_mm"


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


class _GroupedLinear(torch.autograd.Function):
    """Forward and the gradients as grouped GEMMs (torch's own backward of _grouped_mm needs contiguous grads); the
    bias is added per expert segment in place and its gradient summed per segment (no (N, out) gathered bias)."""

    @staticmethod
    def forward(ctx, x, w, bias, offsets, sizes):
        ctx.save_for_backward(x, w, offsets)
        ctx.sizes, ctx.has_bias = sizes, bias is not None
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
        if bias is not None:
            for e, segment in enumerate(torch.split(y, sizes)):
                segment.add_(bias[e])
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, w, offs=offsets) if ctx.needs_input_grad[0] else None
        grad_w = torch._grouped_mm(grad.t(), x, offs=offsets) if ctx.needs_input_grad[1] else None
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = torch.stack([segment.sum(0) for segment in torch.split(grad, ctx.sizes)])
        return grad_x, grad_w, grad_b, None, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, counts_list: list[int] | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in) sorted by expert, w (E, out, in), counts (E,) summing to N -> (N, out); ``bias`` (E, out)."""
    sizes = counts_list if counts_list is not None else counts.tolist()
    if backend(x, w) == "grouped_mm":
        return _GroupedLinear.apply(x.contiguous(), w, bias, _offsets(counts), sizes)
    # no early return for empty groups: a (0, out) result must stay in the graph (x, w, bias), or on a rank whose
    # experts get no rows the backward of the expert-parallel all-to-alls never runs and the peers wait forever
    chunks = torch.split(x, sizes)
    if bias is None:
        return torch.cat([chunk @ w[e].t() for e, chunk in enumerate(chunks)])
    return torch.cat([torch.addmm(bias[e], chunk, w[e].t()) for e, chunk in enumerate(chunks)])
