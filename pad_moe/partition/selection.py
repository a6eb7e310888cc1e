"""Exact k-th largest selection over values sharded across ranks, by radix refinement of order-preserving integer keys.

Each pass histograms one digit of the keys still in play (per group), a ``count_reducer`` sums the counts across ranks
(an all-reduce; the identity in one process), and every rank picks the same digit. Nothing but counts leaves a rank.
Memory: the float32 scores plus an int32 key, a digit and two bool flags per local entry, and the bins (at most
``MAX_BINS`` int64). Exact with ties, signed zeros and infinities. Pure tensor code: no ``torch.distributed`` here.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch

CountReducer = Callable[[torch.Tensor], torch.Tensor]
FLOAT_KEY_BITS = 32  # float32 scores -> signed int32 keys
INDEX_KEY_BITS = 63  # global entry indices -> non-negative int64 keys
INDEX_MAX = (1 << INDEX_KEY_BITS) - 1
INELIGIBLE_KEY = -(1 << 31)  # below every float key, -inf's included: only a NaN bit pattern maps here
MAX_BINS = 1 << 20  # per pass, over all groups: bounds the all-reduced tensor to 8 MiB


def identity_reducer(counts: torch.Tensor) -> torch.Tensor:
    return counts


def float_order_keys(values: torch.Tensor) -> torch.Tensor:
    """float values (n,) -> int32 keys (n,) ordered like the values; -0.0 and +0.0 get the same key."""
    v = values.detach().to(torch.float32).reshape(-1)
    if torch.isnan(v).any():
        raise ValueError("scores contain NaN; the loss or the model produced non-finite gradients")
    bits = torch.where(v == 0, torch.zeros_like(v), v).view(torch.int32)  # canonical +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits so larger |v| sorts lower


def float_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of ``float_order_keys`` (the map is its own inverse on the bits)."""
    keys = keys.to(torch.int32)
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)


class Selection(NamedTuple):
    """Per group: the k-th largest key, how many entries equal to it are needed to reach k, and how many there are."""

    key: torch.Tensor  # (G,) int64, in the keys' own representation (signed for float keys)
    needed_ties: torch.Tensor  # (G,) int64, in [1, equal_count] for groups with k >= 1
    equal_count: torch.Tensor  # (G,) int64


def kth_largest_keys(keys: torch.Tensor, k: torch.Tensor, *, key_bits: int, groups: Optional[torch.Tensor] = None,
                     candidates: Optional[torch.Tensor] = None, count_reducer: CountReducer = identity_reducer,
                     digit_bits: int = 16) -> Selection:
    """Exact k-th largest key of every group over the union of all ranks' candidate entries.

    keys (n,): int32 float-order keys (key_bits=32) or int64 in [0, 2^key_bits); groups (n,) ints in [0, G) or None
    (one group); candidates (n,) bool or None (all); k (G,) 1-based, at most the group's global size (a group with
    k < 1 gives a meaningless result: callers select nothing there). Every rank calls this with the same k.
    """
    num_groups = int(k.numel())
    dev = keys.device
    digit_bits = max(1, min(digit_bits, int(math.log2(MAX_BINS // max(num_groups, 1)))))
    prefix = torch.zeros(num_groups, dtype=torch.int64, device=dev)  # unsigned digits chosen so far
    remaining = k.to(device=dev, dtype=torch.int64).clamp(min=1)
    in_play = torch.ones_like(keys, dtype=torch.bool) if candidates is None else candidates.clone()  # (n,)
    equal_count = torch.zeros(num_groups, dtype=torch.int64, device=dev)
    shift = key_bits
    while shift > 0:
        width = min(digit_bits, shift)
        shift -= width
        bins = 1 << width
        digit = _digit(keys, shift, width, key_bits)  # (n,)
        slot = digit[in_play].to(torch.int64)
        if groups is not None:
            slot += groups[in_play].to(torch.int64) * bins
        counts = torch.bincount(slot, minlength=num_groups * bins).to(torch.int64)
        counts = count_reducer(counts).reshape(num_groups, bins)  # (G, bins) over all ranks
        at_or_above = counts.flip(1).cumsum(1).flip(1)  # (G, bins): entries with digit >= d
        chosen = ((at_or_above >= remaining[:, None]).sum(1) - 1).clamp(min=0)  # (G,) largest such d
        above = torch.cat([at_or_above[:, 1:], torch.zeros(num_groups, 1, dtype=torch.int64, device=dev)], 1)
        remaining -= above.gather(1, chosen[:, None]).squeeze(1)
        equal_count = counts.gather(1, chosen[:, None]).squeeze(1)
        prefix |= chosen << shift
        in_play &= digit == (chosen[0] if groups is None else chosen[groups]).to(digit.dtype)
    key = prefix - (1 << 31) if key_bits == FLOAT_KEY_BITS else prefix
    return Selection(key, remaining, equal_count)


def _digit(keys: torch.Tensor, shift: int, width: int, key_bits: int) -> torch.Tensor:
    """Bits [shift, shift+width) of the unsigned key; a signed float key differs from it in the top bit only."""
    digit = keys >> shift
    if key_bits == FLOAT_KEY_BITS and shift + width == FLOAT_KEY_BITS:
        digit = digit + (1 << (width - 1))  # arithmetic shift of a signed key: undo the sign offset
    return digit & ((1 << width) - 1)


def distributed_kth_largest(local_values: torch.Tensor, k: int,
                            count_reducer: CountReducer = identity_reducer) -> torch.Tensor:
    """The k-th largest (1-based) float over the union of every rank's ``local_values``, exactly.

    ``count_reducer`` all-reduces (sums) an int64 counts tensor across the ranks; the identity in one process.
    Returns a float32 scalar (a zero comes back as +0.0).
    """
    keys = float_order_keys(local_values)
    total = int(count_reducer(torch.tensor([keys.numel()], dtype=torch.int64, device=keys.device))[0])
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is outside [1, {total}] (the number of values over all ranks)")
    sel = kth_largest_keys(keys, torch.tensor([k], device=keys.device), key_bits=FLOAT_KEY_BITS,
                           count_reducer=count_reducer)
    return float_from_keys(sel.key)[0]


IndexKeys = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def select_top(scores: torch.Tensor, k: torch.Tensor, index_keys: IndexKeys, *, groups: Optional[torch.Tensor] = None,
               counted: Optional[torch.Tensor] = None, eligible: Optional[torch.Tensor] = None,
               count_reducer: CountReducer = identity_reducer) -> torch.Tensor:
    """Mark the k[g] largest scores of each group, exactly, over all ranks: bool (n,).

    Ties at the threshold are broken by the smallest global index key (int64 >= 0, unique over the union; a tensor
    (n,) or a function from local positions to keys), so the count is exact and every rank agrees. Only ``counted``
    entries take part in the counts (an entry replicated on several ranks is counted by one of them); every entry,
    counted or not, is then marked by the same rule. With ``eligible`` (n,) bool only eligible entries are marked
    (their key sinks below every score, -inf included); each group must hold at least k[g] of them over all ranks.
    """
    score_keys = float_order_keys(scores)  # (n,) int32
    if eligible is not None:
        _check_eligible(eligible, k, groups, counted, count_reducer)
        score_keys = torch.where(eligible, score_keys, torch.full_like(score_keys, INELIGIBLE_KEY))
    sel = kth_largest_keys(score_keys, k, key_bits=FLOAT_KEY_BITS, groups=groups, candidates=counted,
                           count_reducer=count_reducer)
    per_entry = (lambda t: t[0]) if groups is None else (lambda t: t[groups])  # noqa: E731
    threshold = per_entry(sel.key.to(torch.int32))
    chosen = score_keys > threshold  # (n,)
    tied = score_keys == threshold  # (n,)
    partial = sel.needed_ties < sel.equal_count  # (G,) groups that take only part of their ties
    if bool(partial.any()):
        positions = tied.nonzero().squeeze(1)  # (t,) usually few
        keys = index_keys(positions) if callable(index_keys) else index_keys[positions]
        tie_groups = None if groups is None else groups[positions]
        in_tie = None if counted is None else counted[positions]
        # Smallest index first: select the largest reversed keys.
        tie_sel = kth_largest_keys(INDEX_MAX - keys, sel.needed_ties, key_bits=INDEX_KEY_BITS, groups=tie_groups,
                                   candidates=in_tie, count_reducer=count_reducer)
        limit = torch.where(partial, INDEX_MAX - tie_sel.key, torch.full_like(tie_sel.key, INDEX_MAX))  # (G,)
        limit_per_tie = limit[0] if groups is None else limit[tie_groups]
        tied[positions] = keys <= limit_per_tie
    return (chosen | tied) & per_entry(k.to(scores.device) >= 1)


def _check_eligible(eligible: torch.Tensor, k: torch.Tensor, groups: Optional[torch.Tensor],
                    counted: Optional[torch.Tensor], count_reducer: CountReducer) -> None:
    """Raise (on every rank alike) if a group holds fewer than k[g] eligible entries over all ranks."""
    live = eligible if counted is None else eligible & counted  # (n,)
    if groups is None:
        per_group = live.sum().reshape(1).to(torch.int64)
    else:
        per_group = torch.bincount(groups[live].to(torch.int64), minlength=int(k.numel()))
    per_group = count_reducer(per_group)  # (G,) over all ranks
    short = (k.to(per_group.device) > per_group).nonzero().reshape(-1)
    if short.numel():
        g = int(short[0])
        raise ValueError(f"select_top: group {g} asks for k={int(k[g])} entries but holds only {int(per_group[g])} "
                         "eligible ones; ask for at most that many")
