"""The mask protocol every PAD module implements; IMP, export, counting and logging rely on nothing else.

    masks()                 -> {name: bool tensor}   partition masks (True = dynamic), this rank's copy
    set_masks(masks)        -> None                   replace them (shapes checked; values copied in place)
    scale_factors()         -> (λs, λd)              tensors or floats
    dynamic_ratio()         -> float                  fraction of True entries over this module's masks
    set_relaxed_masks(m)    -> None                   real-valued masks used by forward while IMP scores (None: off)
    expert_parallel_masks() -> set of names           masks sharded across expert-parallel ranks (per-expert masks)
    magnitude_scores()      -> {name: tensor}         |λd·W_dyn − λs·W_s| summed onto each mask entry (this rank's part)
    expert_group_name       -> str | None             DeepSpeed expert-parallel group of sharded masks (None: no experts)
    drop_static(flag)       -> None                   λs := 0 for good ("MoE-P": SNIP pruning of the MoE, paper Table 5)

``PadMaskMixin`` is the one implementation, shared by PAD-MoE and PAD-DyConv: a module declares its PAD weights with
``init_pad`` and reads the per-weight masks in forward with ``weight_masks``.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from pad_moe.pad.granularity import get_granularity
from pad_moe.pad.mixing import make_phi, scale_factors_from_phi


@runtime_checkable
class PadModule(Protocol):
    def masks(self) -> dict[str, torch.Tensor]: ...

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None: ...

    def scale_factors(self) -> tuple: ...

    def dynamic_ratio(self) -> float: ...

    def set_relaxed_masks(self, masks: Mapping[str, torch.Tensor] | None) -> None: ...

    def expert_parallel_masks(self) -> set[str]: ...

    def magnitude_scores(self) -> dict[str, torch.Tensor]: ...


def pad_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) for every PAD module in ``model``, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, PadMaskMixin):
            yield name, module


def _buffer_name(mask_name: str) -> str:
    return "mask_" + mask_name.replace(".", "_")


class PadMaskMixin:
    """Mask buffers, scale factor φ and the protocol methods, for any nn.Module with PAD weights.

    Masks live as bool buffers (DeepSpeed casts parameters, not buffers, so they survive bf16/fp16). A module's masks are
    held either by the module itself (one mask shared by all experts / kernels, the paper) or by several *holders*
    (one per expert), each prefixed ``e{global_expert_id}.`` in ``masks()``.
    """

    def init_pad(self, weight_shapes: Mapping[str, tuple[int, ...]], *, granularity: str = "element",
                 scale_mode: str = "both", holders: Mapping[str, nn.Module] | None = None,
                 expert_parallel: bool = False) -> None:
        """Register masks (all dynamic) for ``weight_shapes`` on each holder (default: self) and φ on self."""
        self.granularity = get_granularity(granularity)
        self.scale_mode = scale_mode
        self.phi = make_phi(scale_mode)
        self._weight_shapes = {k: tuple(v) for k, v in weight_shapes.items()}
        self._mask_shapes = self.granularity.mask_shapes(self._weight_shapes)
        self._holders = dict(holders) if holders is not None else {"": self}
        self._expert_parallel = expert_parallel
        self._relaxed: dict[str, torch.Tensor] | None = None
        self.static_dropped = False
        for holder in self._holders.values():
            for name, shape in self._mask_shapes.items():
                holder.register_buffer(_buffer_name(name), torch.ones(shape, dtype=torch.bool))

    # -- protocol -------------------------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        return {prefix + name: getattr(holder, _buffer_name(name))
                for prefix, holder in self._holders.items() for name in self._mask_shapes}

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        current = self.masks()
        if set(masks) != set(current):
            raise ValueError(f"set_masks got names {sorted(masks)}, expected exactly {sorted(current)}")
        for name, new in masks.items():
            if tuple(new.shape) != tuple(current[name].shape):
                raise ValueError(f"mask {name!r} has shape {tuple(new.shape)}, expected {tuple(current[name].shape)}")
            if new.dtype != torch.bool and not torch.all((new == 0) | (new == 1)):
                raise ValueError(f"mask {name!r} has values other than 0/1; pass a bool tensor")
        with torch.no_grad():
            for name, new in masks.items():
                current[name].copy_(new.to(device=current[name].device, dtype=torch.bool))
        self._on_masks_changed()

    expert_group_name: str | None = None

    def scale_factors(self):
        lam_s, lam_d = scale_factors_from_phi(self.phi, self.scale_mode)
        return (0.0 if self.static_dropped else lam_s), lam_d

    def drop_static(self, flag: bool = True) -> None:
        """MoE-P: remove the static part (λs = 0), leaving a pruned MoE whose experts keep only M=1 entries."""
        self.static_dropped = bool(flag)

    def dynamic_ratio(self) -> float:
        masks = self.masks().values()
        return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    def set_relaxed_masks(self, masks: Mapping[str, torch.Tensor] | None) -> None:
        if masks is not None:
            expected = {k: tuple(v.shape) for k, v in self.masks().items()}
            got = {k: tuple(v.shape) for k, v in masks.items()}
            if got != expected:
                raise ValueError(f"relaxed masks {got} do not match the masks {expected}")
        self._relaxed = dict(masks) if masks is not None else None

    def expert_parallel_masks(self) -> set[str]:
        return set(self.masks()) if self._expert_parallel else set()

    # -- for the module's forward ---------------------------------------------------------------------------------
    def weight_masks(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Per-weight masks (broadcastable to each weight) of one holder: relaxed ones while IMP scores."""
        source = self._relaxed if self._relaxed is not None else self.masks()
        partition = {name: source[prefix + name] for name in self._mask_shapes}
        return self.granularity.expand(partition, self._weight_shapes)

    def _on_masks_changed(self) -> None:
        """Hook for modules that cache something derived from the masks."""
