"""Helpers for tests of run folders: put a finished run back into the state a crash would have left it in."""

from __future__ import annotations

import os
import shutil

from pad_moe.train.checkpoints import point_latest


def cut_back_to(run_dir, step: int) -> None:
    """The run as a crash right after checkpoint ``step`` leaves it: newer checkpoints and the summary gone, ``latest``
    at ``step`` (its partition folder may be newer than the step, as after a real crash)."""
    ckpt = os.path.join(run_dir, "checkpoints")
    for name in os.listdir(ckpt):
        if name.startswith("step") and int(name[4:]) > step:
            shutil.rmtree(os.path.join(ckpt, name))
    point_latest(ckpt, f"step{step}")
    os.remove(os.path.join(run_dir, "summary.json"))
