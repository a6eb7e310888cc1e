"""Run directories, checkpoints and exact resume.

RUN_DIR/config.yaml          the resolved config (written once; a resume must match it)
RUN_DIR/partition/           masks + partition record, written right after the partition
RUN_DIR/checkpoints/stepN/   DeepSpeed checkpoint + one RNG file per rank + manifest (see ``checkpoints``)
RUN_DIR/summary.json         the run's summary, losses from step 1 (kept across resumes)

The source of truth for a step is its checkpoint: its masks, and in its client state the partition record (None before
the partition ran), the losses so far and the step. RUN_DIR/partition is the partition as written when it ran; a resume
checks that the checkpoint's masks equal it, and a resume from before the partition runs the partition again (IMP is
deterministic) and rewrites it.
RUN_DIR/tensorboard/         event files (DeepSpeed monitor + pad_moe scalars)
"""

from __future__ import annotations

import os
import shutil

import torch
import yaml

from pad_moe import distributed as D
from pad_moe.config import RunConfig, save_config, to_dict
from pad_moe.train import checkpoints

# Config fields a resumed run must share with the run it continues.
RESUME_KEYS = ("model", "moe.mode", "moe.num_experts", "moe.ep_size", "moe.k", "moe.granularity",
               "moe.mask_sharing", "moe.scale_mode", "moe.compact", "moe.every", "moe.router_z_loss_coef",
               "partition.kappa", "partition.method", "partition.warmup_steps", "partition.nested",
               "partition.score_loss", "partition.iterations", "partition.scorer", "partition.num_batches",
               "partition.seed", "train.micro_batch_size", "train.grad_accum", "train.lr", "train.seed", "data.task",
               "data.num_labels", "data.text_files", "data.seed", "data.max_train", "data.max_length")


_UNSET = "<not recorded>"


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _UNSET
        tree = tree[part]
    return tree


def check_run_dir(cfg: RunConfig, resume: bool) -> None:
    """Fresh run: refuse a run dir that already holds a run. Resume: the saved config must match on RESUME_KEYS."""
    path = os.path.join(cfg.run_dir, "config.yaml")
    exists = os.path.isfile(path)
    if resume:
        if not exists:
            raise D.UsageError(f"--resume: {cfg.run_dir} holds no run (no config.yaml); drop --resume to start it")
        try:
            with open(path) as f:
                saved = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise D.UsageError(f"--resume: {path} cannot be read ({type(err).__name__}); restore the run's config.yaml "
                               "or start a new run name") from None
        if not isinstance(saved, dict):
            raise D.UsageError(f"--resume: {path} is not a run config (a mapping); restore it or start a new run name")
        now = to_dict(cfg)
        for key in RESUME_KEYS:
            if _lookup(saved, key) != _lookup(now, key):
                raise D.UsageError(f"--resume: {key} is {_lookup(now, key)!r} but the run in {cfg.run_dir} used "
                                   f"{_lookup(saved, key)!r}; resume with the same {key} or start a new run name")
        return
    if exists or os.path.isdir(os.path.join(cfg.run_dir, "checkpoints")):
        raise D.UsageError(f"run directory {cfg.run_dir} already holds a run; pass --resume to continue it or set "
                           "name=<new name>")


def create_run_dir(cfg: RunConfig, resume: bool, rank: int) -> bool:
    """Write RUN_DIR/config.yaml for a fresh run (after the model, data and DeepSpeed config were built and checked,
    so a refused run leaves nothing behind); returns whether this call created the run directory."""
    if resume:
        return False
    path = os.path.join(cfg.run_dir, "config.yaml")
    D.barrier()  # every rank checked before rank 0 creates the directory
    created = not os.path.exists(cfg.run_dir)
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, path)
    D.barrier()
    return created


def remove_fresh_run_dir(cfg: RunConfig, rank: int) -> None:
    """Undo create_run_dir after a start that failed before the first step (nothing of value is in it yet)."""
    if rank == 0:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)


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


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def save_checkpoint(engine, cfg: RunConfig, step: int, rank: int, world: int, record: dict | None,
                    losses: list[float]) -> None:
    """A crash-safe checkpoint of step ``step`` (see ``checkpoints.save``) with the partition record and losses."""
    checkpoints.save(engine, checkpoint_root(cfg.run_dir), step, rank, world,
                     {"step": step, "partition": record, "losses": list(losses)}, cfg.train.keep_checkpoints)


def find_resume_point(run_dir: str, world: int) -> checkpoints.ResumePoint:
    return checkpoints.find_resume_point(checkpoint_root(run_dir), world)


def load_checkpoint(engine, run_dir: str, point: checkpoints.ResumePoint, rank: int) -> dict:
    """Load ``point`` into the engine; returns its client state (step, partition record, losses)."""
    client = checkpoints.load(engine, checkpoint_root(run_dir), point, rank)
    if int(client.get("step", -1)) != point.step:
        raise D.UsageError(f"--resume: checkpoint {point.tag} holds step {client.get('step')!r}, its manifest says "
                           f"{point.step}; the folder was altered: resume from another checkpoint")
    return client


def check_masks_match_partition(run_dir: str, model, record: dict) -> None:
    """The masks loaded from a checkpoint must be the run's partition (RUN_DIR/partition): the two cannot disagree."""
    from pad_moe.pad.protocol import pad_modules

    before = [{k: v.clone() for k, v in module.masks().items()} for _, module in pad_modules(model)]
    if not has_run_partition(run_dir):
        raise D.UsageError(f"--resume: the checkpoint has a partition record but {run_dir}/partition is missing; "
                           "restore it or start a new run")
    saved = load_run_partition(run_dir, model)
    after = [module.masks() for _, module in pad_modules(model)]
    same = all(torch.equal(a[k].cpu(), b[k].cpu()) for a, b in zip(before, after) for k in a)
    if not same or {k: v for k, v in saved.items() if k in record} != record:
        raise D.UsageError(f"--resume: the checkpoint's masks or partition record differ from {run_dir}/partition; "
                           "the run folder was altered: resume from a copy that is intact or start a new run")


def gather_rank_major(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate a same-sized tensor from every rank, rank 0 first."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
