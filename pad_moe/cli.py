"""``padmoe``: the command line, one argparse tree. Bad input prints one line naming the value and the fix, and exits
with status 2 (argument errors: argparse's usage and its one ``error:`` line).

    padmoe train CONFIG [key=value ...] [--resume]     (under the deepspeed launcher for several ranks)
    padmoe config [CONFIG] [key=value ...]             print the resolved config (validates it)
    padmoe presets                                     list model presets
    padmoe count NAME_OR_CONFIG [--mode ...] [--kappa K] [--convention paper] [--json]
    padmoe export CHECKPOINT_DIR --out DIR             compact deploy model
    padmoe consolidate CHECKPOINT_DIR --out PATH       full weights of an expert-parallel checkpoint
    padmoe reshard CHECKPOINT_DIR --ep N --world W --out DIR
    padmoe upcycle DENSE_DIR --out DIR [--experts 8] [--k 2]   dense Llama/Mistral -> native Mixtral MoE
    padmoe plan PRESET --kappa K --nodes N --gpus-per-node G --ep E --zero S --dtype bf16 --micro-batch B --seq L

``padmoe COMMAND --help`` lists a command's options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from pad_moe.commands import Register, add_command, dispatch, run_command  # noqa: F401 - re-exported


# -- the run commands; every other command registers itself in the module that implements it ------------------------
def register_train(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="train (run under the deepspeed launcher for several ranks)",
                       description="Train per a YAML run config; key=value overrides win over the file.")
    t.add_argument("config", help="YAML run config (see configs/)")
    t.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. moe.ep_size=2 train.steps=50")
    t.add_argument("--resume", action="store_true", help="continue RUN_DIR from its latest checkpoint")
    t.add_argument("--local_rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # deepspeed launcher
    t.set_defaults(handler=_train, error_prog="padmoe")
    return t


def _train(args) -> int:
    from pad_moe.config import load_config

    cfg = load_config(args.config, args.overrides)
    from pad_moe.train.loop import train

    summary = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: summary[k] for k in ("name", "mode", "steps", "eval", "wall_time_s")}))
    return 0


def register_config(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("config", help="print the resolved config (validates it)",
                       description="Print the resolved run config: the file (or the defaults), its model preset, "
                                   "then the overrides.")
    c.add_argument("config", nargs="?", default=None, help="YAML run config (default: the built-in defaults)")
    c.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE")
    c.set_defaults(handler=_config, error_prog="padmoe")
    return c


def _config(args) -> int:
    import yaml

    from pad_moe.config import load_config, to_dict

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not os.path.exists(path):  # `padmoe config a.b=1`: no file, overrides
        path, overrides = None, [path, *overrides]
    cfg = load_config(path, overrides)
    from pad_moe.train.loop import preflight

    preflight(cfg)  # the checks train makes before it loads anything
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def register_presets(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("presets", help="list model presets", description="List the model presets (model.preset=NAME).")
    p.set_defaults(handler=_presets, error_prog="padmoe")
    return p


def _presets(args) -> int:
    from pad_moe.presets import MODEL_PRESETS

    for name, sections in sorted(MODEL_PRESETS.items()):
        print(f"{name:16s} {json.dumps(sections['model'])}")
    return 0


def commands() -> tuple[Register, ...]:
    """Every subcommand's registration, in the order ``padmoe --help`` lists them."""
    from pad_moe.deploy import COMMANDS as DEPLOY
    from pad_moe.hfmoe.compress import register as compress
    from pad_moe.lm.upcycle_native import register as upcycle
    from pad_moe.plan.planner import register as plan

    return (register_train, register_config, register_presets, *DEPLOY, compress, upcycle, plan)


# -- the tree -------------------------------------------------------------------------------------------------------
def build_parser(registrations: Optional[Sequence[Register]] = None, prog: str = "padmoe") -> argparse.ArgumentParser:
    """The command tree of ``registrations`` (default: every command)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--local_rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in commands() if registrations is None else registrations:
        add_command(sub, register)
    return p


def _setup_env() -> None:
    # Offline by default: never reach a model/data hub at run time.
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns on stderr before every error
    except ImportError:
        pass


def main(argv: Optional[Sequence[str]] = None, registrations: Optional[Sequence[Register]] = None,
         prog: str = "padmoe") -> int:
    _setup_env()
    args = build_parser(registrations, prog).parse_args(None if argv is None else list(argv))
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
