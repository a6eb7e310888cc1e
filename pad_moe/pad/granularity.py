"""Mask granularities: what one mask entry covers, and how partition masks expand to per-weight masks.

A granularity maps the shapes of a module's PAD weights (name -> shape) to the shapes of its *partition masks* (the
entries IMP scores and thresholds), and expands partition masks (bool, or real-valued while IMP relaxes them) back to
one broadcastable mask per weight. Adding a granularity (e.g. ``block``) means adding one class to ``GRANULARITIES``.
"""

from __future__ import annotations

from typing import Mapping

import torch

Shapes = Mapping[str, tuple[int, ...]]

# The FFN weight names of the two expert types (nn.Linear layout): mlp fc1 (F, H), fc2 (H, F); glu gate_proj and
# up_proj (F, H), down_proj (H, F). Biases are optional (both present or both absent).
FFN_WEIGHTS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
GLU_WEIGHTS = ("gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias", "down_proj.weight",
               "down_proj.bias")

# How each FFN weight meets the hidden units: "row" (one row per unit, (F, in)), "entry" (a bias entry per unit),
# "column" (one column per unit, (out, F)) or "static" (the output bias: not indexed by units, always static).
UNIT_LAYOUTS = {
    "mlp": {"fc1.weight": "row", "fc1.bias": "entry", "fc2.weight": "column", "fc2.bias": "static"},
    "glu": {"gate_proj.weight": "row", "gate_proj.bias": "entry", "up_proj.weight": "row", "up_proj.bias": "entry",
            "down_proj.weight": "column", "down_proj.bias": "static"},
}


def unit_layout(weight_shapes: Shapes) -> dict[str, str]:
    """The role of each weight in ``weight_shapes`` under the FFN layout it matches (mlp or glu, with or without
    biases); ValueError when it matches none."""
    names = set(weight_shapes)
    for layout in UNIT_LAYOUTS.values():
        weights = {n for n in layout if n.endswith(".weight")}
        if weights <= names <= set(layout) and len(names) in (len(weights), len(layout)):
            return {n: layout[n] for n in weight_shapes}
    raise ValueError(f"granularity='neuron' needs the weights of an FFN ({FFN_WEIGHTS} or {GLU_WEIGHTS}, biases "
                     f"optional), got {tuple(weight_shapes)}; use granularity='element' for other layers")


class ElementGranularity:
    """One mask entry per weight entry (the paper)."""

    name = "element"

    def mask_shapes(self, weight_shapes: Shapes) -> dict[str, tuple[int, ...]]:
        return {name: tuple(shape) for name, shape in weight_shapes.items()}

    def expand(self, masks: Mapping[str, torch.Tensor], weight_shapes: Shapes) -> dict[str, torch.Tensor]:
        return dict(masks)

    def reduce(self, per_weight: Mapping[str, torch.Tensor], weight_shapes: Shapes) -> dict[str, torch.Tensor]:
        """Weight-shaped scores summed onto the mask entries that cover them (here: one entry per weight entry)."""
        return dict(per_weight)


class NeuronGranularity:
    """One mask entry per FFN hidden unit: for mlp a row of fc1.weight, its fc1.bias entry and the matching fc2.weight
    column; for glu the rows of gate_proj and up_proj (and their bias entries) and the matching down_proj column.

    The output bias (fc2.bias, down_proj.bias) is not indexed by hidden units; it stays static (one shared value), so
    that experts of a compacted layer keep nothing but their dynamic units.
    """

    name = "neuron"

    def mask_shapes(self, weight_shapes: Shapes) -> dict[str, tuple[int, ...]]:
        layout = unit_layout(weight_shapes)
        row = next(n for n, role in layout.items() if role == "row")
        return {"units": (weight_shapes[row][0],)}

    def expand(self, masks: Mapping[str, torch.Tensor], weight_shapes: Shapes) -> dict[str, torch.Tensor]:
        units = masks["units"]  # (F,)
        by_role = {
            "row": lambda name: units[:, None],  # (F, 1) broadcasts over (F, H)
            "entry": lambda name: units,
            "column": lambda name: units[None, :],  # (1, F) broadcasts over (H, F)
            "static": lambda name: units.new_zeros(weight_shapes[name][0]),  # always static
        }
        return {name: by_role[role](name) for name, role in unit_layout(weight_shapes).items()}

    def reduce(self, per_weight: Mapping[str, torch.Tensor], weight_shapes: Shapes) -> dict[str, torch.Tensor]:
        """Weight-shaped scores summed onto the hidden units (the output bias, always static, is not scored)."""
        by_role = {"row": lambda t: t.sum(1), "entry": lambda t: t, "column": lambda t: t.sum(0)}
        parts = [by_role[role](per_weight[name]) for name, role in unit_layout(weight_shapes).items()
                 if role != "static"]
        return {"units": sum(parts[1:], parts[0])}


GRANULARITIES = {g.name: g for g in (ElementGranularity(), NeuronGranularity())}


def get_granularity(name: str):
    """The granularity registered under ``name``."""
    if name not in GRANULARITIES:
        raise ValueError(f"granularity={name!r} is unknown; allowed: {', '.join(GRANULARITIES)}")
    return GRANULARITIES[name]
