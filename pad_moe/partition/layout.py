"""Where every mask entry of a model sits: this rank's flat vector of entries, and one global order all ranks agree on.

A mask is *replicated* (shared by the layer's experts, or a module without experts: every rank holds a copy) or
*sharded* (a per-expert mask ``e{global_id}.<name>``, held by the ranks that hold that expert). An entry's global index
key is ``module_index << 48 | mask_ordinal << 32 | flat_index``, where the ordinal of a per-expert mask comes from its
global expert id, so the order does not depend on ep_size or on which rank holds the expert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from pad_moe.pad.protocol import pad_modules
from pad_moe.partition import collectives as C

_EXPERT_MASK = re.compile(r"e(\d+)\.(.+)")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine or DDP wrapper (so module names do not depend on the wrapper)."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and type(model).__name__ in ("DeepSpeedEngine", "PipelineEngine",
                                                                  "DistributedDataParallel"):
        return inner
    return model


@dataclass(frozen=True)
class MaskSlot:
    module_index: int
    module_name: str
    mask_name: str
    sharded: bool
    ordinal: int
    shape: tuple
    offset: int  # start in this rank's flat vector
    numel: int


class MaskLayout:
    """The PAD masks of a model as one flat vector per rank, with global index keys and process groups."""

    def __init__(self, model: nn.Module):
        self.modules = list(pad_modules(unwrap(model)))
        if not self.modules:
            raise ValueError(f"model ({type(unwrap(model)).__name__}) has no PAD modules; build it with mode='pad' "
                             "(PadMoE / PAD-DyConv layers) before partitioning")
        if len(self.modules) >= 1 << 15:
            raise ValueError(f"{len(self.modules)} PAD modules exceed the index key's 2^15")
        self.slots: list[MaskSlot] = []
        sharded_groups = set()
        offset = 0
        for index, (name, module) in enumerate(self.modules):
            masks, sharded = module.masks(), module.expert_parallel_masks()
            if sharded:
                sharded_groups.add(module.expert_group_name)
            for mask_name, ordinal in _ordinals(name, list(masks), sharded).items():
                mask = masks[mask_name]
                if mask.numel() >= 1 << 32 or ordinal >= 1 << 16:
                    raise ValueError(f"mask {name}.{mask_name} is too large for the index key")
                self.slots.append(MaskSlot(index, name, mask_name, mask_name in sharded, ordinal, tuple(mask.shape),
                                           offset, mask.numel()))
                offset += mask.numel()
        self.numel = offset
        self.device = next(iter(self.modules[0][1].masks().values())).device
        if len(sharded_groups) > 1:
            raise ValueError(f"per-expert masks use several expert groups {sorted(map(str, sharded_groups))}; "
                             "IMP needs one expert-parallel size for all PAD layers with per-expert masks")
        self.expert_group = next(iter(sharded_groups), None)
        self.selection_reducer = C.expert_parallel_reducer(self.expert_group)
        owner = C.expert_parallel_rank(self.expert_group) == 0
        dev = self.device
        self.counted = torch.cat([torch.full((s.numel,), s.sharded or owner or not self.selection_reducer.active,
                                             device=dev) for s in self.slots])  # (n,) entries counted by this rank
        self.sharded = torch.cat([torch.full((s.numel,), s.sharded, device=dev) for s in self.slots])  # (n,)
        self._starts = torch.tensor([s.offset for s in self.slots], device=dev)  # (S,)
        self._base_keys = torch.tensor([(s.module_index << 48) + (s.ordinal << 32) for s in self.slots], device=dev)

    # -- per-entry vectors ----------------------------------------------------------------------------------------
    def index_keys_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Global index keys (int64) of local flat positions (m,), computed on demand (only ties need them)."""
        slot = torch.searchsorted(self._starts, positions, right=True) - 1
        return self._base_keys[slot] + positions - self._starts[slot]

    def flat_masks(self) -> torch.Tensor:
        masks = [m.masks() for _, m in self.modules]
        return torch.cat([masks[s.module_index][s.mask_name].detach().reshape(-1).to(self.device) for s in self.slots])

    def split(self, flat: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """A flat (n,) vector -> per module {mask name: tensor of the mask's shape}."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in self.modules]
        for s in self.slots:
            out[s.module_index][s.mask_name] = flat[s.offset:s.offset + s.numel].reshape(s.shape)
        return out

    def set_flat_masks(self, flat: torch.Tensor) -> None:
        for (_, module), masks in zip(self.modules, self.split(flat.to(torch.bool)), strict=True):
            module.set_masks(masks)

    def group_ids(self, scope: str) -> Optional[torch.Tensor]:
        """Selection group of each entry: None for scope 'global' (one group), the module index (int32) for 'layer'."""
        if scope == "global":
            return None
        return torch.cat([torch.full((s.numel,), s.module_index, dtype=torch.int32, device=self.device)
                          for s in self.slots])  # (n,)

    # -- global totals ----------------------------------------------------------------------------------------------
    def local_per_module(self, flat: torch.Tensor) -> torch.Tensor:
        """Per module, this rank's count of True entries of ``flat`` (n,), counted entries only: (M,) int64."""
        out = torch.zeros(len(self.modules), dtype=torch.int64, device=self.device)
        for s in self.slots:
            part = slice(s.offset, s.offset + s.numel)
            out[s.module_index] += (flat[part].to(torch.bool) & self.counted[part]).sum()
        return out

    def count_per_module(self, flat: torch.Tensor) -> torch.Tensor:
        """Per module, True entries of ``flat`` over all ranks, each entry once: (M,) int64."""
        return self.selection_reducer.sum(self.local_per_module(flat))

    def count(self, flat: torch.Tensor) -> int:
        """True entries of ``flat`` over all ranks, each entry once."""
        return int(self.count_per_module(flat).sum())

    def totals(self, scope: str) -> list[int]:
        """Entries per selection group over all ranks."""
        per_module = self.count_per_module(torch.ones_like(self.counted)).tolist()
        return [sum(per_module)] if scope == "global" else per_module


def _ordinals(module_name: str, names: list[str], sharded: set[str]) -> dict[str, int]:
    replicated = [n for n in names if n not in sharded]
    ordinals = {n: i for i, n in enumerate(replicated)}
    base_names: list[str] = []
    for n in names:
        if n in sharded:
            match = _EXPERT_MASK.fullmatch(n)
            if match is None:
                raise ValueError(f"per-expert mask {module_name}.{n} is not named e<global expert id>.<name>")
            if match.group(2) not in base_names:
                base_names.append(match.group(2))
    for n in names:
        if n in sharded:
            match = _EXPERT_MASK.fullmatch(n)
            gid, base = int(match.group(1)), match.group(2)
            ordinals[n] = len(replicated) + gid * len(base_names) + base_names.index(base)
    return ordinals
