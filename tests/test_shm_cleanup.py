"""DeepSpeed's CPU shared-memory all-reduce never unlinks its /dev/shm buffers (66 MiB per rank, named by port): pad_moe
unlinks each rank's buffer name once all ranks have mapped it, so runs on fresh ports do not fill the machine's RAM."""

import os

import torch

from pad_moe.testing.ranks import run_ranks


def worker(rank, world):
    import torch.distributed as dist

    from pad_moe.distributed import shm_buffer_path

    t = torch.ones(4) * (rank + 1)
    dist.all_reduce(t)  # the shm all-reduce still works after the names are gone
    return shm_buffer_path(rank), os.path.exists(shm_buffer_path(rank)), float(t[0])


def test_two_rank_run_leaves_no_shm_buffer_behind():
    results = run_ranks(worker, 2)
    for path, exists, total in results:
        assert "deepspeed_allreduce_buffer" in path and not exists and not os.path.exists(path)
        assert total == 3.0
