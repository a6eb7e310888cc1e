"""``padmoe``: the command line. Bad input prints one line naming the value and the fix, and exits with status 2.

    padmoe train CONFIG [key=value ...] [--resume]     (under the deepspeed launcher for several ranks)
    padmoe config CONFIG [key=value ...]               print the resolved config (validates it)
    padmoe presets                                     list model presets
    padmoe count NAME_OR_CONFIG [--mode ...] [--kappa K] [--convention paper] [--json]
    padmoe export CHECKPOINT_DIR --out DIR             compact deploy model
    padmoe consolidate CHECKPOINT_DIR --out PATH       full weights of an expert-parallel checkpoint
    padmoe reshard CHECKPOINT_DIR --ep N --world W --out DIR
    padmoe plan PRESET --kappa K --nodes N --gpus-per-node G --ep E --zero S --dtype bf16 --micro-batch B --seq L
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DELEGATED = ("count", "export", "consolidate", "reshard")


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="padmoe", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (run under the deepspeed launcher for several ranks)")
    t.add_argument("config", help="YAML run config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. moe.ep_size=2 train.steps=50")
    t.add_argument("--resume", action="store_true", help="continue RUN_DIR from its latest checkpoint")
    t.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    c = sub.add_parser("config", help="print the resolved config")
    c.add_argument("config", nargs="?", default=None)
    c.add_argument("overrides", nargs="*")
    sub.add_parser("presets", help="list model presets")
    for name in DELEGATED:
        d = sub.add_parser(name, add_help=False, help=f"padmoe {name} --help for its options")
        d.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "plan":  # its own argparse (padmoe plan --help)
        from pad_moe.plan import plan_main

        return plan_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command in DELEGATED:
        from pad_moe.deploy import MAINS

        return MAINS[args.command](args.rest)
    from pad_moe.config import load_config, to_dict

    try:
        if args.command == "presets":
            from pad_moe.presets import MODEL_PRESETS

            for name, sections in sorted(MODEL_PRESETS.items()):
                print(f"{name:16s} {json.dumps(sections['model'])}")
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        from pad_moe.train.loop import train

        summary = train(cfg, resume=args.resume)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({k: summary[k] for k in ("name", "mode", "steps", "eval", "wall_time_s")}))
        return 0
    except ValueError as err:  # config / input errors (UsageError included)
        print(f"padmoe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
