"""Iterative Mode Partition (IMP) of PAD modules, its baselines, the exact distributed selection, and persistence.

Works on any model whose PAD modules follow ``pad_moe.pad.protocol``; collectives live in ``collectives`` only.
"""

from pad_moe.partition.imp import (
    METHODS,
    SCHEDULES,
    SCOPES,
    PartitionReport,
    dynamic_count,
    iterative_mode_partition,
    kappa_schedule,
    moe_p_partition,
    partition,
    partition_from_config,
    random_partition,
    verify_replicas,
)
from pad_moe.partition.persist import load_partition, save_partition
from pad_moe.partition.scoring import SCORERS
from pad_moe.partition.selection import distributed_kth_largest, float_from_keys, float_order_keys

__all__ = [
    "METHODS", "SCHEDULES", "SCOPES", "SCORERS", "PartitionReport", "distributed_kth_largest", "dynamic_count",
    "float_from_keys", "float_order_keys", "iterative_mode_partition", "kappa_schedule", "load_partition",
    "moe_p_partition", "partition", "partition_from_config", "random_partition", "save_partition", "verify_replicas",
]
