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
    if 0 in w.shape[1:]:
        return "loop"
    align = 16 // x.element_size()  # every row of every operand must start on a 16-byte boundary
    if w.shape[1] % align or w.shape[2] % align:
        return "loop"
    return "grouped_mm"


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


class _GroupedLinear(torch.autograd.Function):
    """Forward and both gradients as grouped GEMMs (torch's own backward of _grouped_mm needs contiguous grads)."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad):
        x, w, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, w, offs=offsets) if ctx.needs_input_grad[0] else None
        grad_w = torch._grouped_mm(grad.t(), x, offs=offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, counts_list: list[int] | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in) sorted by expert, w (E, out, in), counts (E,) summing to N -> (N, out); ``bias`` (E, out)."""
    if backend(x, w) == "grouped_mm":
        y = _GroupedLinear.apply(x.contiguous(), w, _offsets(counts))
    else:
        sizes = counts_list if counts_list is not None else counts.tolist()
        y = torch.cat([chunk @ w[e].t() for e, chunk in enumerate(torch.split(x, sizes))]) if x.shape[0] else \
            x.new_zeros(0, w.shape[1])
    if bias is not None:
        y = y + torch.repeat_interleave(bias, counts, dim=0, output_size=x.shape[0])
    return y
