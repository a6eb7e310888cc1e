"""Deploy: compact export, MoE checkpoint consolidation and resharding, parameter accounting (issue 6).

    count(resolve(name_or_config), mode=..., kappa=..., convention="ours"|"paper")   counts from configuration alone
    export(checkpoint_dir, out) / load_deployed(out)                                 compact single-process model
    consolidate(checkpoint_dir, out) / load_training_form(checkpoint_dir)            full weights, global expert ids
    reshard(checkpoint_dir, ep, world, out)                                          a run folder for another layout

Command-line entry points (each returns an exit status; bad input prints one line and returns 2): ``count_main``,
``export_main``, ``consolidate_main``, ``reshard_main``; ``python -m pad_moe.deploy COMMAND ...`` runs them.
"""

from pad_moe.deploy.checkpoint import CheckpointError, read_checkpoint, read_optimizer_state
from pad_moe.deploy.consolidate import consolidate, consolidate_main, load_training_form
from pad_moe.deploy.count import count, count_main, resolve
from pad_moe.deploy.export import compact_model, export, export_main, load_deployed, save_deployed
from pad_moe.deploy.reshard import reshard, reshard_main

MAINS = {"count": count_main, "export": export_main, "consolidate": consolidate_main, "reshard": reshard_main}

__all__ = ["CheckpointError", "MAINS", "compact_model", "consolidate", "consolidate_main", "count", "count_main",
           "export", "export_main", "load_deployed", "load_training_form", "read_checkpoint", "read_optimizer_state",
           "reshard", "reshard_main", "resolve", "save_deployed"]
