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


def read_summary(run_dir) -> dict:
    import json

    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def launch_train(args: list, ranks: int = 1, timeout: float = 600):
    """``padmoe train ARGS`` from the repository root, on one process or under the deepspeed launcher with ``ranks``
    CPU ranks; the completed process (an AssertionError with the tail of stderr when it fails)."""
    import subprocess
    import sys

    from pad_moe.distributed import free_port

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}  # not the caller's process group (its port)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", DEEPSPEED_TIMEOUT="2")
    if ranks == 1:
        argv = [sys.executable, "-m", "pad_moe", "train", *args]
    else:
        argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
                str(free_port()), "--module", "pad_moe.cli", "train", *args]
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
