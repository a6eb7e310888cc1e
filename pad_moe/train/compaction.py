"""In-place compaction after the warm-up partition: from then on step time and memory follow κ.

An upcycled model cannot be partitioned before training (its experts are identical copies: IMP's scores are zero), so
it trains fully dynamic for ``partition.warmup_steps``, is partitioned, and with ``moe.compact`` its neuron-granularity
PAD layers shrink in place (static units once per token, experts keep only their dynamic units). The DeepSpeed engine
is then rebuilt around the narrower parameters and the optimizer keeps, for every entry that survives, its fp32 master
and moments (Adam's step, the learning-rate schedule and the engine's counters too), so training continues exactly as
the uncompacted PAD model would have: the compacted layer computes the same function, masked entries get no gradient.
"""

from __future__ import annotations

import copy

import torch

from pad_moe import distributed as D
from pad_moe.pad.protocol import pad_modules


def kept_entries(name: str, param: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """The part of a parameter's saved (full-width) state that its compacted successor keeps."""
    where = getattr(param, "_compacted_from", None)
    value = saved if where is None else saved.index_select(where[0], where[1].to(saved.device))
    if tuple(value.shape) != tuple(param.shape):
        raise RuntimeError(f"rebuilt engine: {name} has shape {tuple(param.shape)}, its saved state "
                           f"{tuple(value.shape)}")
    return value


def compact_model_(model: torch.nn.Module) -> int:
    """compact_() every PAD layer of ``model``; the number of layers compacted."""
    layers = [m for _, m in pad_modules(model) if hasattr(m, "compact_")]
    for module in layers:
        module.compact_()
    return len(layers)


def compact_and_rebuild(engine, model: torch.nn.Module, cfg, world: int, total_steps: int, ds: dict):
    """Compact ``model`` (the engine's module) in place and return a new engine over it that carries on the old one's
    optimizer state, schedule, counters and TensorBoard writer. The old engine is destroyed (its hooks removed)."""
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    snapshot = D.optimizer_snapshot(engine)  # collective under ZeRO 1/2: every rank, same order
    monitor = getattr(engine, "monitor", None)
    engine.destroy()
    D.detach_expert_groups(model)  # deepspeed.initialize attaches the expert-parallel groups again
    compact_model_(model)
    fresh = copy.deepcopy(ds)
    fresh.pop("tensorboard", None)  # the old writer carries on: one event file per run
    rebuilt, _ = D.initialize_engine(model, cfg, world, total_steps, fresh)
    D.restore_optimizer(rebuilt, snapshot, kept_entries)
    for p in model.parameters():
        if hasattr(p, "_compacted_from"):
            del p._compacted_from
    if monitor is not None:
        rebuilt.monitor = monitor
    rebuilt.train()
    torch.set_rng_state(rng[0])  # building an engine draws random numbers: dropout goes on as without the rebuild
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
    del snapshot
    _release_freed_host_memory()
    return rebuilt


def _release_freed_host_memory() -> None:
    """Hand the full-size state freed by the rebuild back to the OS (glibc keeps freed heap otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
