"""Every collective IMP uses, in one place. Without an initialised process group each one is the identity.

Groups follow DeepSpeed's layout: a PAD module's per-expert masks live on the ranks of its expert-parallel (EP) group
(consecutive ranks), and the replicas of one expert form its expert-data-parallel (EDP) group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@dataclass(frozen=True)
class Reducer:
    """Sums (or maxes) tensors over one process group; ``group=None`` with ``active=False`` is the identity."""

    group: Optional[object] = None
    active: bool = False

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM if self.active else None)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX if self.active else None)

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if op is None:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out, op=op, group=self.group)
        return out

    __call__ = sum  # a count reducer for ``selection``


IDENTITY = Reducer()


def world_reducer() -> Reducer:
    return Reducer(None, True) if is_distributed() and world_size() > 1 else IDENTITY


def _ensure_expert_groups(group_name: str):
    from deepspeed.utils import groups

    if group_name not in groups._get_expert_parallel_group_dict():
        match = re.fullmatch(r"ep_size_(\d+)", group_name)
        if match is None:
            raise ValueError(f"expert group {group_name!r} does not exist and its size cannot be read from its name; "
                             "create DeepSpeed's expert groups (deepspeed.initialize or set_deepspeed_parallelism)")
        groups._create_expert_and_data_parallel(int(match.group(1)))  # collective: every rank gets here together
    return groups


def expert_parallel_reducer(group_name: Optional[str]) -> Reducer:
    """Sums over the ranks that hold the different experts of a layer (identity when there is one)."""
    if group_name is None or not is_distributed():
        return IDENTITY
    groups = _ensure_expert_groups(group_name)
    if groups._get_expert_parallel_world_size(group_name) == 1:
        return IDENTITY
    return Reducer(groups._get_expert_parallel_group(group_name), True)


def expert_data_parallel_reducer(group_name: Optional[str]) -> Reducer:
    """Sums over the replicas of the same experts (the whole world when there are no experts)."""
    if group_name is None or not is_distributed():
        return world_reducer()
    groups = _ensure_expert_groups(group_name)
    if groups._get_expert_data_parallel_world_size(group_name) == 1:
        return IDENTITY
    return Reducer(groups._get_expert_data_parallel_group(group_name), True)


def expert_parallel_rank(group_name: Optional[str]) -> int:
    if group_name is None or not is_distributed():
        return 0
    return _ensure_expert_groups(group_name)._get_expert_parallel_rank(group_name)


def check_agreement(values: torch.Tensor, reducer: Reducer) -> torch.Tensor:
    """bool (n,): True where every rank of the reducer's group holds the same int64 value."""
    both = torch.cat([values, -values]).to(torch.int64)
    both = reducer.max(both)
    n = values.numel()
    return both[:n] == -both[n:]
