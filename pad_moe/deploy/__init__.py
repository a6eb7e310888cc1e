"""Deploy: compact export, MoE checkpoint consolidation and resharding, parameter accounting (issue 6).

    count(resolve(name_or_config), mode=..., kappa=..., convention="ours"|"paper")   counts from configuration alone
    export(checkpoint_dir, out) / load_deployed(out)                                 compact single-process model
    consolidate(checkpoint_dir, out) / load_training_form(checkpoint_dir)            full weights, global expert ids
    reshard(checkpoint_dir, ep, world, out)                                          a run folder for another layout

Command line: each module registers its ``padmoe`` subcommand (``register(subparsers)``, see :mod:`pad_moe.cli`);
``count_main``, ``export_main``, ``consolidate_main``, ``reshard_main`` run one of them on an argv and return the exit
status (bad input: one line on stderr, 2); ``python -m pad_moe.deploy COMMAND ...`` is ``padmoe COMMAND ...``.
"""

from pad_moe.deploy.checkpoint import CheckpointError, read_checkpoint, read_optimizer_state
from pad_moe.deploy.consolidate import consolidate, consolidate_main, load_training_form
from pad_moe.deploy.consolidate import register as _register_consolidate
from pad_moe.deploy.count import count, count_main, resolve
from pad_moe.deploy.count import register as _register_count
from pad_moe.deploy.export import compact_model, export, export_main, load_deployed, save_deployed
from pad_moe.deploy.export import register as _register_export
from pad_moe.deploy.reshard import register as _register_reshard
from pad_moe.deploy.reshard import reshard, reshard_main

COMMANDS = (_register_count, _register_export, _register_consolidate, _register_reshard)
"""The deploy subcommands' registrations (``padmoe count|export|consolidate|reshard``)."""
MAINS = {"count": count_main, "export": export_main, "consolidate": consolidate_main, "reshard": reshard_main}

__all__ = ["COMMANDS", "CheckpointError", "MAINS", "compact_model", "consolidate", "consolidate_main", "count",
           "count_main", "export", "export_main", "load_deployed", "load_training_form", "read_checkpoint",
           "read_optimizer_state", "reshard", "reshard_main", "resolve", "save_deployed"]
