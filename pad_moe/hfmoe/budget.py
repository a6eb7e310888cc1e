"""Stored bytes of ``padmoe compress``'s outputs, planned from the model's shapes (a meta-device model is enough) and
measured on the live model; ``--target-bytes-ratio`` and per-expert masks pick their sizes here.

What an output stores (``bytes_stored`` in its pad_deploy.json; the tensors of its safetensors files, fp32 values):
every tensor outside the sparse blocks' experts as it is, and per block

- PAD, layer-shared masks: the masks, 1 bit per weight entry (3·F·H bits), λs·W_s at the N − D static entries and
  every expert's D dynamic entries (E·D), N = 3·F·H; with D in mask entries (element: 1 value, neuron: a unit of 3H
  values) the values are linear in the model's total D: 4·(other + ΣN + (E − 1)·u·D) bytes;
- PAD, per-expert masks: E·3·F·H mask bits, each expert's own dynamic entries and W_s wherever some expert is static;
- drop / reap: the kept experts (and their router rows) whole.

κ under ``--mask-sharing expert`` is a byte budget: the bytes of the layer-shared PAD model at κ (same granularity);
the per-expert partition keeps as many dynamic entries as fit after paying for its E-times larger masks (κ = 1 keeps
every entry: the source exactly, masks included). Permutations of ``--align`` are not stored (the permuted experts are
the model): 0 bytes.
"""

from __future__ import annotations

import math

from torch import nn

from pad_moe.errors import UsageError
from pad_moe.partition import dynamic_count

VALUE_BYTES = 4  # fp32: the dtype the export stores
TOLERANCE = 0.02


class ByteModel:
    """Bytes of each output of one model (its shapes only)."""

    def __init__(self, model: nn.Module):
        from pad_moe.hfmoe.experts import block_router, moe_blocks
        from pad_moe.hfmoe.families import family_spec

        spec = family_spec(model)
        blocks = moe_blocks(model)
        self.total = stored_numel(model)  # tied parameters once, persistent buffers included
        self.shapes = [spec.expert_layout.sizes(block.experts) for _, block in blocks]  # (E, F, H) per block
        self.expert_params = sum(3 * E * F * H for E, F, H in self.shapes)
        # per block, the values of one expert's row in every tensor indexed by expert (router rows, weights, biases)
        state = {name: t.numel() for name, t in model.state_dict().items()}
        self.per_expert_values = [sum(state[n] for n in spec.expert_indexed(name) if n in state)
                                  // block_router(model, block).weight.shape[0] for name, block in blocks]
        self.source = VALUE_BYTES * self.total

    def uniform(self, what: str) -> tuple[int, int, int]:
        if len(set(self.shapes)) != 1:
            raise UsageError(f"{what} needs sparse blocks of one size; this model's are {sorted(set(self.shapes))}")
        return self.shapes[0]

    def entries(self, granularity: str) -> int:
        """Mask entries of one layer-shared mask set over the model (element: weights, neuron: hidden units)."""
        return sum((3 * F * H if granularity == "element" else F) for _, F, H in self.shapes)

    @staticmethod
    def unit(granularity: str, H: int) -> int:
        return 1 if granularity == "element" else 3 * H

    def mask_bytes(self, sharing: str) -> int:
        return sum(3 * math.ceil(F * H * (E if sharing == "expert" else 1) / 8) for E, F, H in self.shapes)

    def pad(self, dynamic: int, granularity: str, sharing: str = "layer") -> int:
        """PAD with ``dynamic`` mask entries dynamic over the model (layer: entries of the shared masks; expert: the
        experts' own entries, W_s assumed stored everywhere: an upper bound)."""
        E, _, H = self.uniform("counting PAD's bytes")
        u = self.unit(granularity, H)
        static = sum(3 * F * H for _, F, H in self.shapes)
        if sharing == "layer":
            values = self.total - self.expert_params + static + (E - 1) * u * dynamic
        else:
            values = self.total - self.expert_params + static + u * dynamic
        return VALUE_BYTES * values + self.mask_bytes(sharing)

    def drop(self, keep: int) -> int:
        """Drop / reap keeping ``keep`` experts per block (their router rows too)."""
        removed = sum((E - keep) * per for (E, _, _), per in zip(self.shapes, self.per_expert_values, strict=True))
        return VALUE_BYTES * (self.total - removed)


def _refuse(ratio: float, method: str, reachable: str, nearest: float):
    raise UsageError(f"--target-bytes-ratio {ratio:g} cannot be met within {TOLERANCE:.0%} by --method {method}, which "
                     f"stores {reachable} of the source's bytes; the nearest reachable ratio is {nearest:.4f}")


def within(got: int, target: float) -> bool:
    return abs(got - target) <= TOLERANCE * target


def kappa_for_ratio(bm: ByteModel, ratio: float, granularity: str, method: str) -> float:
    """κ whose layer-shared PAD output stores ``ratio`` × the source's bytes (within 2 %), else one line."""
    E, _, H = bm.uniform("--target-bytes-ratio")
    T, target = bm.entries(granularity), ratio * bm.source
    step = VALUE_BYTES * (E - 1) * bm.unit(granularity, H)
    base = bm.pad(0, granularity)
    D = min(T, max(1, round((target - base) / step))) if step else T
    got = bm.pad(D, granularity)
    if not within(got, target):
        _refuse(ratio, method, f"{bm.pad(1, granularity) / bm.source:.4f} to {bm.pad(T, granularity) / bm.source:.4f}",
                got / bm.source)
    return D / T


def expert_entries_for_bytes(bm: ByteModel, target: float, granularity: str, what: str) -> int:
    """Dynamic entries of per-expert masks (over all experts) whose output stores about ``target`` bytes (W_s counted
    everywhere: the partition then tops up what the all-dynamic entries free); one line when none fit."""
    E, _, H = bm.uniform(what)
    base = bm.pad(0, granularity, "expert")
    K = math.floor((target - base) / (VALUE_BYTES * bm.unit(granularity, H)))
    if K < 1:
        raise UsageError(f"{what}: per-expert masks alone ({bm.mask_bytes('expert')} bytes) leave no room for dynamic "
                         f"entries in {int(target)} bytes; the smallest reachable ratio is "
                         f"{bm.pad(1, granularity, 'expert') / bm.source:.4f} of the source: ask for more")
    return min(K, E * bm.entries(granularity))


def layer_pad_bytes(bm: ByteModel, kappa: float, granularity: str) -> int:
    """The bytes of the layer-shared PAD output at κ (IMP's global count)."""
    return bm.pad(dynamic_count(kappa, bm.entries(granularity)), granularity)


def keep_for_ratio(bm: ByteModel, ratio: float, method: str) -> int:
    """The number of experts per block whose drop / reap output stores ``ratio`` × the source's bytes (within 2 %);
    refuses in one line, naming the nearest reachable ratio, rather than round into a mismatch."""
    E, _, _ = bm.uniform("--target-bytes-ratio")
    target = ratio * bm.source
    keep = min(range(1, E + 1), key=lambda k: abs(bm.drop(k) - target))
    if not within(bm.drop(keep), target):
        options = ", ".join(f"{bm.drop(k) / bm.source:.4f}" for k in range(1, E + 1))
        _refuse(ratio, method, f"one of {options} (1..{E} experts)", bm.drop(keep) / bm.source)
    return keep


def check_fixed_ratio(bm: ByteModel, ratio: float, got: int, method: str) -> None:
    if not within(got, ratio * bm.source):
        _refuse(ratio, method, f"{got / bm.source:.4f}", got / bm.source)


def stored_numel(model: nn.Module) -> int:
    """Values a model's state holds: its parameters (tied ones once) and persistent buffers, PAD masks excepted."""
    from pad_moe.hfmoe.experts import PadHFExperts

    pad = [name + "." for name, m in model.named_modules() if isinstance(m, PadHFExperts)]
    state = set(model.state_dict(keep_vars=True))
    buffers = sum(b.numel() for name, b in model.named_buffers()
                  if name in state and not any(name.startswith(p) for p in pad))
    return sum(p.numel() for p in model.parameters()) + buffers


def live_pad_bytes(model: nn.Module) -> int:
    """The bytes the export of a live PAD-imported model stores (values at fp32 + bit-packed masks)."""
    from pad_moe.hfmoe.experts import PadHFExperts, moe_blocks

    values, masks = stored_numel(model), 0
    for _, block in moe_blocks(model):
        experts = block.experts
        if isinstance(experts, PadHFExperts):
            values += experts.stored_params() - sum(p.numel() for p in experts.parameters(recurse=False))
            E, F, H = experts.num_experts, experts.intermediate_dim, experts.hidden_dim
            masks += 3 * math.ceil(F * H * (E if experts.mask_sharing == "expert" else 1) / 8)
    return VALUE_BYTES * values + masks


