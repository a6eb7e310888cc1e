"""The user-facing error of pad_moe, and the argparse value types built on it (no heavy imports: the deploy, plan and
config code raise it without loading DeepSpeed).

Bad input (config values, files, shapes, world sizes, checkpoints, flags) raises :class:`UsageError` (or any
``ValueError``) with one line naming the value and the fix; the command line prints it as ``padmoe ...: error: ...``
and exits with status 2, before anything is written to disk.
"""

from __future__ import annotations

import argparse
import math


class UsageError(ValueError):
    """Bad user input (config, files, flags, world size): reported as one line, exit status 2."""


def finite_float(text: str) -> float:
    """argparse ``type=``: a finite number (``nan``, ``inf`` and ``1e999`` are refused with argparse's one line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number") from None
    return value


__all__ = ["UsageError", "finite_float"]
