"""Exact k-th largest selection over values sharded across ranks, by radix refinement of order-preserving integer keys.

Each pass histograms one digit of the keys still in play (per group), the counts are summed across ranks by a
``count_reducer`` (an all-reduce; the identity in one process), and every rank picks the same digit. Nothing but counts
leaves a rank: memory is O(local values + bins), and the result is exact, ties and signed zeros included.
Pure tensor code: no ``torch.distributed`` here (the reducer is passed in).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

CountReducer = Callable[[torch.Tensor], torch.Tensor]
FLOAT_KEY_BITS = 32
INDEX_KEY_BITS = 63
MAX_BINS = 1 << 20  # per pass, over all groups: bounds the all-reduced tensor to 8 MiB


def identity_reducer(counts: torch.Tensor) -> torch.Tensor:
    return counts


def float_order_keys(values: torch.Tensor) -> torch.Tensor:
    """float32 values (n,) -> int64 keys (n,) in [0, 2^32) with the same order; -0.0 and +0.0 get one key."""
    v = values.detach().to(torch.float32).reshape(-1)
    if torch.isnan(v).any():
        raise ValueError("scores contain NaN; the loss or the model produced non-finite gradients")
    v = torch.where(v == 0, torch.zeros_like(v), v)  # canonical +0.0
    bits = v.view(torch.int32).to(torch.int64)  # sign-extended
    return torch.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))


def float_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of ``float_order_keys`` (zeros come back as +0.0)."""
    keys = keys.to(torch.int64)
    bits = torch.where(keys >= (1 << 31), keys - (1 << 31), ((1 << 31) - 1 - keys) - (1 << 31))
    return bits.to(torch.int32).view(torch.float32)


class Selection(NamedTuple):
    """Per group: the k-th largest key, how many entries equal to it are needed to reach k, and how many there are."""

    key: torch.Tensor  # (G,) int64
    needed_ties: torch.Tensor  # (G,) int64, in [1, equal_count] for groups with k >= 1
    equal_count: torch.Tensor  # (G,) int64


def kth_largest_keys(keys: torch.Tensor, groups: torch.Tensor, k: torch.Tensor, *, key_bits: int,
                     count_reducer: CountReducer = identity_reducer, digit_bits: int = 16) -> Selection:
    """Exact k-th largest key of every group over the union of all ranks' entries.

    keys (n,) int64 in [0, 2^key_bits); groups (n,) int64 in [0, G); k (G,) int64, 1-based, at most the group's global
    size (groups with k < 1 give meaningless results: callers treat them as 'nothing selected'). Every rank must call
    this with the same k and G; ``count_reducer`` sums an int64 counts tensor over the ranks that share the selection.
    """
    num_groups = int(k.numel())
    keys, groups = keys.reshape(-1).to(torch.int64), groups.reshape(-1).to(torch.int64)
    digit_bits = max(1, min(digit_bits, int(math.log2(MAX_BINS // max(num_groups, 1)))))
    dev = keys.device
    prefix = torch.zeros(num_groups, dtype=torch.int64, device=dev)
    remaining = k.to(device=dev, dtype=torch.int64).clamp(min=1)
    in_play = torch.ones_like(keys, dtype=torch.bool)  # entries whose higher digits match the prefix so far
    equal_count = torch.zeros(num_groups, dtype=torch.int64, device=dev)
    shift = key_bits
    while shift > 0:
        width = min(digit_bits, shift)
        shift -= width
        bins = 1 << width
        digit = (keys >> shift) & (bins - 1)  # (n,)
        slot = groups[in_play] * bins + digit[in_play]
        counts = torch.bincount(slot, minlength=num_groups * bins).to(torch.int64)
        counts = count_reducer(counts).reshape(num_groups, bins)  # (G, bins) over all ranks
        at_or_above = counts.flip(1).cumsum(1).flip(1)  # (G, bins): entries with digit >= d
        chosen = ((at_or_above >= remaining[:, None]).sum(1) - 1).clamp(min=0)  # (G,) largest such d
        above = torch.cat([at_or_above[:, 1:], torch.zeros(num_groups, 1, dtype=torch.int64, device=dev)], 1)
        remaining -= above.gather(1, chosen[:, None]).squeeze(1)
        equal_count = counts.gather(1, chosen[:, None]).squeeze(1)
        prefix |= chosen << shift
        in_play &= digit == chosen[groups]
    return Selection(prefix, remaining, equal_count)


def distributed_kth_largest(local_values: torch.Tensor, k: int,
                            count_reducer: CountReducer = identity_reducer) -> torch.Tensor:
    """The k-th largest (1-based) float over the union of every rank's ``local_values``, exactly.

    ``count_reducer`` all-reduces (sums) an int64 counts tensor across the ranks; the identity in one process.
    Returns a float32 scalar (a zero comes back as +0.0).
    """
    keys = float_order_keys(local_values)
    groups = torch.zeros_like(keys)
    total = int(count_reducer(torch.tensor([keys.numel()], dtype=torch.int64, device=keys.device))[0])
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is outside [1, {total}] (the number of values over all ranks)")
    sel = kth_largest_keys(keys, groups, torch.tensor([k], device=keys.device), key_bits=FLOAT_KEY_BITS, count_reducer=count_reducer)
    return float_from_keys(sel.key)[0]


def select_top(scores: torch.Tensor, groups: torch.Tensor, index_keys: torch.Tensor, counted: torch.Tensor,
               k: torch.Tensor, count_reducer: CountReducer = identity_reducer) -> torch.Tensor:
    """Mark the k[g] largest scores of each group, exactly, over all ranks: bool (n,).

    Ties at the threshold are broken by the smallest global ``index_keys`` (int64 >= 0, unique over the union), so the
    count is exact and every rank agrees. Only ``counted`` entries take part in the counts (an entry replicated on several
    ranks is counted by one of them); every entry, counted or not, is then marked by the same rule.
    """
    score_keys = float_order_keys(scores)  # (n,)
    sel = kth_largest_keys(score_keys[counted], groups[counted], k, key_bits=FLOAT_KEY_BITS,
                           count_reducer=count_reducer)
    threshold = sel.key[groups]  # (n,)
    chosen = score_keys > threshold
    tied = score_keys == threshold
    # Groups that need only part of their ties resolve them by global index order (smallest index first).
    partial = sel.needed_ties < sel.equal_count  # (G,)
    tie_limit = torch.full_like(sel.key, INDEX_MAX)  # (G,) largest index key taken among ties
    if bool(partial.any()):
        reversed_index = INDEX_MAX - index_keys  # smallest index = largest key
        in_tie = tied & counted
        tie_sel = kth_largest_keys(reversed_index[in_tie], groups[in_tie], sel.needed_ties, key_bits=INDEX_KEY_BITS,
                                   count_reducer=count_reducer)
        tie_limit = torch.where(partial, INDEX_MAX - tie_sel.key, tie_limit)
    chosen |= tied & (index_keys <= tie_limit[groups])
    return chosen & (k[groups] >= 1)


INDEX_MAX = (1 << INDEX_KEY_BITS) - 1
