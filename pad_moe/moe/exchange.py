"""The only collectives of the dropless MoE layer: variable-size all-to-all over DeepSpeed's expert-parallel group.

Kept apart from the layer math (which only calls ``exchange_counts`` / ``AllToAllV``) so the layer runs without a
process group at ``ep_size == 1``. Goes through ``deepspeed.comm`` like DeepSpeed's own MoE.
"""

from __future__ import annotations

import torch


def _comm():
    from deepspeed import comm

    return comm


def exchange_counts(send: torch.Tensor, group) -> torch.Tensor:
    """send (ep, E_local) int64: rows this rank sends to rank r's local expert j -> the same table received from each
    source rank: recv[r, j] = rows rank r sends to this rank's local expert j."""
    recv = torch.empty_like(send)
    _comm().all_to_all_single(recv, send.contiguous(), group=group)
    return recv


class AllToAllV(torch.autograd.Function):
    """Rows grouped by destination rank -> rows grouped by source rank; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        _comm().all_to_all_single(out, x.contiguous(), output_split_sizes=recv_splits,
                                  input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.send_splits),) + tuple(grad.shape[1:]))
        _comm().all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send_splits,
                                  input_split_sizes=ctx.recv_splits, group=ctx.group)
        return back, None, None, None
