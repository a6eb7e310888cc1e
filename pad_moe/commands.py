"""The command tree's machinery below the CLI: a command's registration type, adding it to a subparser tree,
running a parsed command (bad input: one line, status 2) and running one command on its own (``*_main(argv)``).
Command modules import this, never ``pad_moe.cli`` (which imports them)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

Register = Callable[[argparse._SubParsersAction], argparse.ArgumentParser]
"""A subcommand's registration: ``register(subparsers)`` adds its subparser (options, help) with
``set_defaults(handler=fn)``, where ``fn(args) -> exit status`` raises ``ValueError`` (``UsageError``) on bad input;
it returns the subparser. ``set_defaults(error_prog=...)`` changes the prefix of its error line (default: its prog)."""


def add_command(sub, register: Register) -> argparse.ArgumentParser:
    parser = register(sub)
    if parser.get_default("error_prog") is None:
        parser.set_defaults(error_prog=parser.prog)
    return parser


def dispatch(args: argparse.Namespace) -> int:
    """Run a parsed command; bad input (ValueError, UsageError included, or an unusable path) is one line, status 2."""
    _quiet_progress_bars()
    try:
        return args.handler(args)
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{args.error_prog}: error: {message}", file=sys.stderr)
        return 2
    except Exception as err:
        # a weights file the commands' own checks did not reach: one line, never torch's advice to unpickle unsafely
        kind = type(err).__name__
        if kind == "SafetensorError":
            message = f"a .safetensors weights file is truncated or corrupt ({' '.join(str(err).split())[:160]}); " \
                      "copy or download the model again"
        elif kind == "UnpicklingError":
            message = "a PyTorch weights file holds pickled Python objects besides tensors, which pad_moe does not " \
                      "load; use the model's safetensors weights (model.safetensors)"
        else:
            raise
        print(f"{args.error_prog}: error: {message}", file=sys.stderr)
        return 2


def _quiet_progress_bars() -> None:
    """No Hugging Face progress bars ("Loading weights ...", on stderr, before any error line) unless the user set
    HF_HUB_DISABLE_PROGRESS_BARS; modules imported already read it at import, so they are told too."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()


def run_command(register: Register, argv: Optional[Sequence[str]] = None) -> int:
    """One command on its own (``count_main(argv)`` and friends): its subparser parses ``argv``."""
    sub = argparse.ArgumentParser(prog="padmoe").add_subparsers()
    return dispatch(add_command(sub, register).parse_args(None if argv is None else list(argv)))
