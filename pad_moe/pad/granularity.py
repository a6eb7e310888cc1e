"""Mask granularities: what one mask entry covers, and how partition masks expand to per-weight masks.

A granularity maps the shapes of a module's PAD weights (name -> shape) to the shapes of its *partition masks* (the
entries IMP scores and thresholds), and expands partition masks (bool, or real-valued while IMP relaxes them) back to
one broadcastable mask per weight. Adding a granularity (e.g. ``block``) means adding one class to ``GRANULARITIES``.
"""

from __future__ import annotations

from typing import Mapping

import torch

Shapes = Mapping[str, tuple[int, ...]]

# The FFN weight names every PAD FFN uses (nn.Linear layout: fc1 (F, H), fc2 (H, F)).
FFN_WEIGHTS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class ElementGranularity:
    """One mask entry per weight entry (the paper)."""

    name = "element"

    def mask_shapes(self, weight_shapes: Shapes) -> dict[str, tuple[int, ...]]:
        return {name: tuple(shape) for name, shape in weight_shapes.items()}

    def expand(self, masks: Mapping[str, torch.Tensor], weight_shapes: Shapes) -> dict[str, torch.Tensor]:
        return dict(masks)


class NeuronGranularity:
    """One mask entry per FFN hidden unit: a row of fc1.weight, its fc1.bias entry and the matching fc2.weight column.

    fc2.bias is not indexed by hidden units; it stays static (one shared value), so that experts of a compacted layer keep
    nothing but their dynamic units.
    """

    name = "neuron"

    def mask_shapes(self, weight_shapes: Shapes) -> dict[str, tuple[int, ...]]:
        if set(weight_shapes) != set(FFN_WEIGHTS):
            raise ValueError(f"granularity='neuron' needs FFN weights {FFN_WEIGHTS}, got {tuple(weight_shapes)}; "
                             "use granularity='element' for other layers")
        return {"units": (weight_shapes["fc1.weight"][0],)}

    def expand(self, masks: Mapping[str, torch.Tensor], weight_shapes: Shapes) -> dict[str, torch.Tensor]:
        units = masks["units"]  # (F,)
        hidden = weight_shapes["fc2.bias"][0]
        return {
            "fc1.weight": units[:, None],  # (F, 1) broadcasts over (F, H)
            "fc1.bias": units,
            "fc2.weight": units[None, :],  # (1, F) broadcasts over (H, F)
            "fc2.bias": units.new_zeros(hidden),  # always static
        }


GRANULARITIES = {g.name: g for g in (ElementGranularity(), NeuronGranularity())}


def get_granularity(name: str):
    """The granularity registered under ``name``."""
    if name not in GRANULARITIES:
        raise ValueError(f"granularity={name!r} is unknown; allowed: {', '.join(GRANULARITIES)}")
    return GRANULARITIES[name]
