"""Deploy: compact export, MoE checkpoint consolidation and resharding, parameter accounting (issue 6).

    count(resolve(name_or_config), mode=..., kappa=..., convention="ours"|"paper")   counts from configuration alone
    export(checkpoint_dir, out) / load_deployed(out)                                 compact single-process model
    consolidate(checkpoint_dir, out) / load_training_form(checkpoint_dir)            full weights, global expert ids
    reshard(checkpoint_dir, ep, world, out)                                          a run folder for another layout

Command line: each module registers its ``padmoe`` subcommand (``register(subparsers)``, see :mod:`pad_moe.cli`);
``count_main``, ``export_main``, ``consolidate_main``, ``reshard_main`` run one of them on an argv and return the exit
status (bad input: one line on stderr, 2); ``python -m pad_moe.deploy COMMAND ...`` is ``padmoe COMMAND ...``.
"""

import importlib

# Public names, imported on first use: loading a deploy folder (``load_deployed``) must not import DeepSpeed, which
# consolidation and resharding need.
_EXPORTS = {
    "CheckpointError": "checkpoint", "read_checkpoint": "checkpoint", "read_optimizer_state": "checkpoint",
    "consolidate": "consolidate", "consolidate_main": "consolidate", "load_training_form": "consolidate",
    "count": "count", "count_main": "count", "resolve": "count",
    "compact_model": "export", "export": "export", "export_main": "export", "load_deployed": "export",
    "save_deployed": "export", "reshard": "reshard", "reshard_main": "reshard",
}
_COMMAND_MODULES = ("count", "export", "consolidate", "reshard")


def __getattr__(name):
    if name == "COMMANDS":  # the deploy subcommands' registrations (padmoe count|export|consolidate|reshard)
        return tuple(importlib.import_module(f"pad_moe.deploy.{m}").register for m in _COMMAND_MODULES)
    if name == "MAINS":
        return {m: getattr(importlib.import_module(f"pad_moe.deploy.{m}"), f"{m}_main") for m in _COMMAND_MODULES}
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pad_moe.deploy.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pad_moe.deploy' has no attribute {name!r}")


__all__ = ["COMMANDS", "MAINS", *sorted(_EXPORTS)]
