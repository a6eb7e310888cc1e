"""The registry of HF MoE families: one ``FamilySpec`` per transformers ``model_type`` (``register_family``).

The core (import, counting, compress, the causal-LM job) names no family: it asks the registry where a family's sparse
blocks keep their router and experts, how the experts are laid out (``layouts``), which tensors have one row per
expert (``--method drop`` slices them), and what a smaller copy's config must change. A model type that cannot be
supported is registered as refused (``refuse_family``): one line naming it, never a silent wrong result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from pad_moe.hfmoe.families.layouts import ExpertLayout, layout_named


def _no_change(_config, _keep: int) -> dict:
    return {}


def _no_check(_config) -> None:
    return None


@dataclass(frozen=True)
class FamilySpec:
    """One HF MoE family (see the module doc). The doc fields feed docs/lm.md's table."""

    model_type: str
    title: str
    experts_key: str  # the config.json key of the number of routed experts per sparse block
    router: str = "gate"  # the sparse block's attribute holding the router (its ``weight``: (E, H))
    router_tensors: tuple[str, ...] = ("weight",)  # the router's tensors with one row per expert
    layout: str = "concatenated"  # pad_moe.hfmoe.families.layouts
    aux_loss: bool = True  # the HF model returns a load-balancing loss (output_router_logits)
    routing: str = ""  # how the router scores and picks (doc)
    shared: str = "none"  # shared experts (doc; they stay the model's own, outside PAD)
    dense_layers: str = "none"  # which layers keep a dense FFN (doc)
    drop_config: Callable = field(default=_no_change, compare=False)
    """(config, keep) -> the config fields a copy with ``keep`` experts per block changes besides the expert count and
    top-k (raise ValueError when the family cannot route over that many)."""
    check: Callable = field(default=_no_check, compare=False)
    """config -> raise ValueError (one line) for a configuration of the family pad_moe does not support."""

    @property
    def expert_layout(self) -> ExpertLayout:
        return layout_named(self.layout)

    def num_experts(self, config) -> int:
        return int(getattr(config, self.experts_key))

    def expert_indexed(self, block: str) -> set[str]:
        """State-dict names of ``block`` with one row per expert (dim 0): router tensors and the experts' own."""
        return ({f"{block}.{self.router}.{t}" for t in self.router_tensors}
                | {f"{block}.experts.{t}" for t in self.expert_layout.native_tensors})


_FAMILIES: dict[str, FamilySpec] = {}
_REFUSED: dict[str, str] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add ``spec`` (a model type is registered once; registering the same spec again is a no-op)."""
    layout_named(spec.layout)  # an unknown layout: refused here, not at the first import
    old = _FAMILIES.get(spec.model_type)
    if old is not None and old != spec:
        raise ValueError(f"HF MoE family {spec.model_type!r} is already registered ({old.title})")
    if spec.model_type in _REFUSED:
        raise ValueError(f"model_type {spec.model_type!r} is registered as refused: {_REFUSED[spec.model_type]}")
    _FAMILIES[spec.model_type] = spec
    return spec


def refuse_family(model_type: str, reason: str) -> None:
    """Register ``model_type`` as not supported: ``family_spec`` answers ``reason`` (one line) for it."""
    if model_type in _FAMILIES:
        raise ValueError(f"model_type {model_type!r} is a registered HF MoE family")
    _REFUSED[model_type] = reason


def registered() -> Mapping[str, FamilySpec]:
    return dict(_FAMILIES)


def lookup(model_type) -> Optional[FamilySpec]:
    return _FAMILIES.get(model_type)


def refusal(model_type) -> Optional[str]:
    """Why ``model_type`` is refused (``refuse_family``), or None."""
    return _REFUSED.get(model_type)


def family_spec(model_or_config) -> FamilySpec:
    """The family of a model or config; one line (ValueError) for a dense model, a refused or an unknown family, or
    a configuration the family's ``check`` refuses."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError("not a Hugging Face model (its config has no model_type)")
    if model_type in _REFUSED:
        raise ValueError(f"model_type={model_type!r}: {_REFUSED[model_type]}")
    spec = _FAMILIES.get(model_type)
    if spec is None:
        raise ValueError(f"model_type={model_type!r} is not an MoE family pad_moe imports ({', '.join(_FAMILIES)}); "
                         "a dense model is upcycled instead (pad_moe.upcycle)")
    spec.check(config)
    return spec


class FamilyTable(Mapping):
    """model_type -> the config key of its routed expert count, a live view of the registry (``HF_MOE_FAMILIES``)."""

    def __getitem__(self, model_type):
        return _FAMILIES[model_type].experts_key

    def __iter__(self):
        return iter(_FAMILIES)

    def __len__(self):
        return len(_FAMILIES)

    def __repr__(self):
        return f"FamilyTable({dict(self)!r})"
