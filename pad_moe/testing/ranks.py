"""Spawn N local processes that form a gloo world (DeepSpeed comm initialised), run ``fn(rank, world, *args)`` in
each, and return every rank's result. Failures on any rank raise in the caller with that rank's traceback.

Ranks time out fast (``DEEPSPEED_TIMEOUT``) so a dead peer fails a test instead of hanging it.
"""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from pad_moe.distributed import free_port  # noqa: F401  (re-exported for the tests)


def _worker(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                      DS_ACCELERATOR="cpu")
    os.environ.setdefault("DEEPSPEED_TIMEOUT", "2")
    try:
        import torch

        torch.set_num_threads(1)
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        from pad_moe.distributed import release_shm_buffer_name

        release_shm_buffer_name()
        queue.put((rank, True, fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(fn, world: int = 2, *args, timeout: float = 300.0) -> list:
    """Results of ``fn(rank, world, *args)`` from each rank, in rank order. ``fn`` must be importable (module level)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            (results if ok else errors)[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} failed:\n{errors[rank]}")
    return [results[r] for r in range(world)]
