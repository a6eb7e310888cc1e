"""Iterative Mode Partition (paper Eq. 5-9) and its baselines: random partition, one-shot (T=1) and MoE-P.

Round t of T keeps ``dynamic_count(κ_t, N)`` = ⌊κ_t·N + ½⌋ entries of each selection group dynamic, with
κ_t = κ^(t/T) (exponential) or 1 − (1−κ)·t/T (linear), scored with the current masks. ``nested=True`` (paper §4.2,
the default): a round ranks only the entries still dynamic, so a static entry stays static and the dynamic sets are
nested, M_t ⊆ M_{t−1}. ``nested=False``: every round ranks all entries afresh. The selection is exact and distributed;
ties at the threshold are broken by a fixed global entry order, so every rank, and any number of ranks, gets the same
masks. Scoring draws random numbers (dropout in ``train_mode``, DeepSpeed's gate noise) from the global RNG seeded
with ``seed`` inside a fork: the masks do not depend on the caller's RNG state, which is left as it was.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from pad_moe.partition import collectives as C
from pad_moe.partition.layout import MaskLayout, unwrap
from pad_moe.partition.scoring import SCORERS, score_entries
from pad_moe.partition.selection import select_top

SCOPES = ("global", "layer")
SCHEDULES = ("exponential", "linear")
METHODS = ("imp", "random", "moe_p")
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class PartitionReport:
    """What a partition did; ``to_dict()`` is the JSON record saved with the masks."""

    method: str
    kappa: float
    iterations: int
    scorer: str
    scope: str
    schedule: str
    seed: int
    num_batches: int
    """Batches scored per round on this rank."""
    world_size: int
    nested: bool = True
    """True: a static entry stays static (paper §4.2); False: every round re-scores all entries."""
    kappa_per_round: list[float] = field(default_factory=list)
    dynamic_per_round: list[int] = field(default_factory=list)
    """Dynamic entries after each round, over all ranks."""
    churn_per_round: list[float] = field(default_factory=list)
    """Fraction of all entries whose mode changed in each round (nested: the fraction made static)."""
    total_entries: int = 0
    layer_ratios: dict[str, float] = field(default_factory=dict)
    """Dynamic fraction of each PAD module over all its masks (all experts)."""
    time_s: float = 0.0

    @property
    def dynamic_fraction(self) -> float:
        return self.dynamic_per_round[-1] / self.total_entries if self.total_entries else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def dynamic_count(kappa: float, total: int) -> int:
    """Entries kept dynamic out of ``total`` for a dynamic fraction ``kappa``: ⌊κ·N + ½⌋."""
    return int(math.floor(kappa * total + 0.5))


def kappa_schedule(kappa: float, iterations: int, schedule: str = "exponential") -> list[float]:
    """κ_1..κ_T; the last one is κ exactly."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    T = iterations
    if schedule == "exponential":
        kappas = [kappa ** (t / T) for t in range(1, T + 1)]
    else:
        kappas = [1 - (1 - kappa) * t / T for t in range(1, T + 1)]
    return kappas[:-1] + [kappa]


def iterative_mode_partition(model: nn.Module, batches: Optional[Iterable], loss_fn: Optional[LossFn], *,
                             kappa: float, iterations: int = 5, scorer: str = "snip", scope: str = "global",
                             schedule: str = "exponential", seed: int = 0, train_mode: bool = False,
                             nested: bool = True,
                             on_round: Optional[Callable[[int, PartitionReport], None]] = None) -> PartitionReport:
    """Partition every PAD module of ``model`` (an nn.Module or a DeepSpeed engine) in place; return the report.

    ``loss_fn(model, batch)`` returns a scalar loss; each rank passes its own batches (its data shard), every rank the
    same number. With an engine, loss_fn receives ``engine.module``: the engine's forward installs backward hooks that
    only ``engine.backward`` satisfies, and IMP must not step the engine. Scoring runs in eval mode unless
    ``train_mode``; parameters' requires_grad and every module's train/eval mode are restored afterwards. Gradients
    are taken w.r.t. the relaxed masks only (no parameter's .grad is touched). ``nested``: see the module docstring;
    it needs the masks to start with at least round 1's count dynamic (a fresh model: all dynamic).
    ``on_round(t, report)`` is called after round t has set the masks.
    """
    _validate(kappa, iterations, scorer, scope, schedule, nested)
    t0 = time.perf_counter()
    layout = MaskLayout(model)
    batch_list = _batch_list(batches, loss_fn, scorer, layout.device)  # drawn with the caller's RNG, if at all
    with _private_rng(seed, layout.device):
        groups = layout.group_ids(scope)  # None (global) or (n,) module index
        totals = layout.totals(scope)  # entries per selection group, over all ranks
        total = sum(totals)
        report = PartitionReport("imp", kappa, iterations, scorer, scope, schedule, seed, len(batch_list),
                                 C.world_size(), nested=nested, total_entries=total)
        kappas = kappa_schedule(kappa, iterations, schedule)
        current = layout.flat_masks()  # (n,) bool
        if nested:
            _check_nested_start(layout, scope, current, [dynamic_count(kappas[0], n) for n in totals])
        with _scoring_mode(model, train_mode):
            for t, kappa_t in enumerate(kappas, start=1):
                scores = score_entries(layout, scorer, model=unwrap(model), batches=batch_list, loss_fn=loss_fn,
                                       seed=seed, round_index=t)  # (n,) float32
                k = torch.tensor([dynamic_count(kappa_t, n) for n in totals], device=layout.device)  # (G,)
                chosen = select_top(scores, k, layout.index_keys_of, groups=groups, counted=layout.counted,
                                    eligible=current if nested else None, count_reducer=layout.selection_reducer)
                del scores
                report.churn_per_round.append(layout.count(chosen != current) / total)
                layout.set_flat_masks(chosen)
                current = chosen
                report.kappa_per_round.append(kappa_t)
                report.dynamic_per_round.append(layout.count(current))
                if on_round is not None:
                    on_round(t, report)
    verify_replicas(model, layout)
    module_dynamic = layout.count_per_module(current).tolist()
    module_totals = layout.count_per_module(torch.ones_like(current)).tolist()
    report.layer_ratios = {name: d / n for (name, _), d, n in
                           zip(layout.modules, module_dynamic, module_totals, strict=True)}
    report.time_s = time.perf_counter() - t0
    return report


def random_partition(model: nn.Module, *, kappa: float, scope: str = "global", seed: int = 0) -> PartitionReport:
    """The random-partition baseline: seeded uniform scores, the same exact selection (so the same exact ratio), over
    all entries whatever the current masks."""
    report = iterative_mode_partition(model, None, None, kappa=kappa, iterations=1, scorer="random", scope=scope,
                                      seed=seed, nested=False)
    report.method = "random"
    return report


def moe_p_partition(model: nn.Module, batches: Iterable, loss_fn: LossFn, **imp_kwargs) -> PartitionReport:
    """MoE-P (paper Table 5): the IMP selection as SNIP pruning of the MoE, static part dropped (λs = 0)."""
    report = iterative_mode_partition(model, batches, loss_fn, **imp_kwargs)
    for _, module in MaskLayout(model).modules:
        module.drop_static()
    report.method = "moe_p"
    return report


def partition(model: nn.Module, batches: Optional[Iterable], loss_fn: Optional[LossFn], *, method: str = "imp",
              **kwargs) -> PartitionReport:
    """One switch for the paper's comparisons: method imp (T=1 is one-shot) | random | moe_p. ``kwargs`` are
    ``iterative_mode_partition``'s (``nested`` included); random uses kappa, scope and seed."""
    if method == "imp":
        return iterative_mode_partition(model, batches, loss_fn, **kwargs)
    if method == "random":
        return random_partition(model, kappa=kwargs["kappa"], scope=kwargs.get("scope", "global"),
                                seed=kwargs.get("seed", 0))
    if method == "moe_p":
        return moe_p_partition(model, batches, loss_fn, **kwargs)
    raise ValueError(f"method={method!r} is unknown; allowed: {', '.join(METHODS)}")


def partition_from_config(model: nn.Module, batches: Optional[Iterable], loss_fn: Optional[LossFn],
                          cfg) -> PartitionReport:
    """``partition`` driven by a ``pad_moe.config.PartitionConfig`` (at most ``cfg.num_batches`` batches are used)."""
    if batches is not None:
        batches = list(itertools.islice(batches, cfg.num_batches))
    return partition(model, batches, loss_fn, method=cfg.method, kappa=cfg.kappa, iterations=cfg.iterations,
                     scorer=cfg.scorer, scope=cfg.scope, schedule=cfg.schedule, seed=cfg.seed, nested=cfg.nested)


def verify_replicas(model: nn.Module, layout: Optional[MaskLayout] = None) -> None:
    """Raise RuntimeError naming the layer if replicas of a mask differ across ranks (all ranks raise alike)."""
    layout = layout or MaskLayout(model)
    masks = [m.masks() for _, m in layout.modules]
    prime = (1 << 31) - 1
    hashes = torch.zeros(2, len(layout.modules), dtype=torch.int64, device=layout.device)  # (replicated|sharded, M)
    for s in layout.slots:
        keys = layout.index_keys_of(torch.arange(s.offset, s.offset + s.numel, device=layout.device))
        weights = ((keys % prime) * 48_271 + 11) % prime  # position-dependent, < 2^31
        flat = masks[s.module_index][s.mask_name].reshape(-1).to(device=layout.device, dtype=torch.int64)
        hashes[int(s.sharded), s.module_index] += (flat * weights).sum()
    agree = C.check_agreement(hashes[0], C.world_reducer())
    agree &= C.check_agreement(hashes[1], C.expert_data_parallel_reducer(layout.expert_group))
    bad = [layout.modules[i][0] for i in range(len(layout.modules)) if not agree[i]]
    if bad:
        raise RuntimeError(f"partition masks differ between replicas of PAD module(s) {bad}: the ranks computed "
                           "different partitions (different scores or models); re-run the partition on all ranks")


def _validate(kappa, iterations, scorer, scope, schedule, nested) -> None:
    if not isinstance(kappa, (int, float)) or not 0 < kappa <= 1:
        raise ValueError(f"kappa={kappa!r} must be in (0, 1]")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations={iterations!r} must be an integer >= 1")
    if scorer not in SCORERS:
        raise ValueError(f"scorer={scorer!r} is unknown; allowed: {', '.join(SCORERS)}")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is unknown; allowed: {', '.join(SCOPES)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    if not isinstance(nested, bool):
        raise ValueError(f"nested={nested!r} must be True or False")


def _check_nested_start(layout: MaskLayout, scope: str, current: torch.Tensor, first_counts: list[int]) -> None:
    """Nested rounds only make entries static: the starting masks must hold round 1's dynamic count per group."""
    per_module = layout.count_per_module(current).tolist()  # over all ranks
    dynamic = [sum(per_module)] if scope == "global" else per_module
    names = ["all PAD modules"] if scope == "global" else [name for name, _ in layout.modules]
    for name, have, need in zip(names, dynamic, first_counts, strict=True):
        if have < need:
            raise ValueError(f"nested=True only makes entries static, but {name} start(s) with {have} dynamic "
                             f"entries and round 1 keeps {need}; reset the masks to all dynamic or pass nested=False")


@contextlib.contextmanager
def _private_rng(seed: int, device: torch.device):
    """The global RNG (CPU, and ``device`` if an accelerator) seeded with ``seed`` inside; the caller's state after."""
    accelerators = [device] if device.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=accelerators, device_type=device.type if accelerators else "cuda"):
        torch.random.default_generator.manual_seed(seed)
        if accelerators:
            backend = getattr(torch, device.type)  # torch.cuda, torch.xpu, ...
            with backend.device(device):
                backend.manual_seed(seed)
        yield


def _batch_list(batches, loss_fn, scorer: str, device: torch.device) -> list:
    if scorer != "snip":
        return list(batches) if batches is not None else []
    if loss_fn is None:
        raise ValueError("scorer='snip' needs loss_fn(model, batch) -> scalar loss")
    batch_list = list(batches) if batches is not None else []
    counts = C.world_reducer().max(torch.tensor([len(batch_list), -len(batch_list)], device=device))
    if int(counts[0]) != -int(counts[1]):
        raise ValueError(f"ranks hold different numbers of batches ({-int(counts[1])} to {int(counts[0])}); give "
                         "every rank the same number (forward passes include collectives)")
    if not batch_list:
        raise ValueError("batches is empty: scorer='snip' needs at least one batch")
    return batch_list


@contextlib.contextmanager
def _scoring_mode(model: nn.Module, train_mode: bool):
    """Parameters frozen (gradients flow to the relaxed masks only) and train/eval set; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.train(train_mode)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
