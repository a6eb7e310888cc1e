"""Run directories, checkpoints and exact resume.

RUN_DIR/config.yaml          the resolved config (written once; a resume must match it)
RUN_DIR/partition/           masks + partition record, written right after the partition (resume never re-partitions)
RUN_DIR/checkpoints/stepN/   DeepSpeed checkpoint + one RNG file per rank; ``latest`` names the newest
RUN_DIR/tensorboard/         event files (DeepSpeed monitor + pad_moe scalars)
"""

from __future__ import annotations

import os

import torch
import yaml

from pad_moe import distributed as D
from pad_moe.config import RunConfig, save_config, to_dict

# Config fields a resumed run must share with the run it continues.
RESUME_KEYS = ("model", "moe.mode", "moe.num_experts", "moe.k", "moe.granularity", "moe.mask_sharing",
               "moe.scale_mode", "moe.compact", "moe.every", "partition.kappa", "partition.method",
               "partition.warmup_steps", "data.task", "data.num_labels", "data.text_files",
               "moe.router_z_loss_coef")


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else None
    return tree


def check_run_dir(cfg: RunConfig, resume: bool) -> None:
    """Fresh run: refuse a run dir that already holds a run. Resume: the saved config must match on RESUME_KEYS."""
    path = os.path.join(cfg.run_dir, "config.yaml")
    exists = os.path.isfile(path)
    if resume:
        if not exists:
            raise D.UsageError(f"--resume: {cfg.run_dir} holds no run (no config.yaml); drop --resume to start it")
        with open(path) as f:
            saved = yaml.safe_load(f)
        now = to_dict(cfg)
        for key in RESUME_KEYS:
            if _lookup(saved, key) != _lookup(now, key):
                raise D.UsageError(f"--resume: {key} is {_lookup(now, key)!r} but the run in {cfg.run_dir} used "
                                   f"{_lookup(saved, key)!r}; resume with the same {key} or start a new run name")
        if not os.path.isfile(os.path.join(cfg.run_dir, "checkpoints", "latest")):
            raise D.UsageError(f"--resume: {cfg.run_dir} has no checkpoint yet; start the run again under a new name")
        return
    if exists or os.path.isdir(os.path.join(cfg.run_dir, "checkpoints")):
        raise D.UsageError(f"run directory {cfg.run_dir} already holds a run; pass --resume to continue it or set "
                           "name=<new name>")


def create_run_dir(cfg: RunConfig, resume: bool, rank: int) -> None:
    """Write RUN_DIR/config.yaml for a fresh run (after the model and data were built, so a refused run leaves
    nothing behind)."""
    if resume:
        return
    path = os.path.join(cfg.run_dir, "config.yaml")
    D.barrier()  # every rank checked before rank 0 creates the directory
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, path)
    D.barrier()


def _partition_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "partition")


def has_run_partition(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(_partition_dir(run_dir), "record.json"))


def save_run_partition(run_dir: str, model, record: dict, rank: int) -> None:
    """Masks (safetensors per rank, keyed by global expert id) and the record, in RUN_DIR/partition."""
    from pad_moe.partition import save_partition

    save_partition(_partition_dir(run_dir), model, record)  # ends with a barrier


def load_run_partition(run_dir: str, model) -> dict:
    from pad_moe.partition import load_partition

    try:
        return load_partition(_partition_dir(run_dir), model)  # also re-drops λs for method=moe_p
    except ValueError as err:
        raise D.UsageError(f"--resume: {err}") from None


def save_checkpoint(engine, run_dir: str, step: int, rank: int, record: dict | None) -> None:
    ckpt = os.path.join(run_dir, "checkpoints")
    tag = f"step{step}"
    engine.save_checkpoint(ckpt, tag=tag, client_state={"step": step, "partition": record})
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(ckpt, tag, f"rng_rank{rank}.pt"))
    D.barrier()


def load_checkpoint(engine, run_dir: str, rank: int) -> int:
    """Load the latest checkpoint into the engine; returns the step it was taken at."""
    ckpt = os.path.join(run_dir, "checkpoints")
    path, client = engine.load_checkpoint(ckpt)
    if path is None:
        raise D.UsageError(f"--resume: no loadable checkpoint under {ckpt}")
    with open(os.path.join(ckpt, "latest")) as f:
        tag_dir = os.path.join(ckpt, f.read().strip())
    rng_path = os.path.join(tag_dir, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(client["step"])


def gather_rank_major(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate a same-sized tensor from every rank, rank 0 first."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
