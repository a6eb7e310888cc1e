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

# Config fields a resume may change (everything else must equal the run it continues: any other change alters the
# trajectory, and the resume would not be the run it claims to continue). Steps/epochs may grow: said in one line.
RESUME_MAY_CHANGE = ("name", "output_dir", "model.path", "train.steps", "train.epochs", "train.log_every",
                     "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.dynamics_batches",
                     "data.max_eval", "data.cache_dir", "vision.dataset_path", "vision.eval_limit", "vision.impl")


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in ("data.data_files",):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


_UNSET = "<not recorded>"


def check_run_dir(cfg: RunConfig, resume: bool) -> str:
    """Fresh run: refuse a run dir that already holds a run. Resume: the saved config must equal this one except on
    RESUME_MAY_CHANGE; returns the one line to print when the length of the run changed (else "")."""
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
        now, then = _flatten(to_dict(cfg)), _flatten(saved)
        for key in sorted(set(now) | set(then)):
            if key in RESUME_MAY_CHANGE or key.split(".")[0] in RESUME_MAY_CHANGE:
                continue
            if now.get(key, _UNSET) != then.get(key, _UNSET):
                raise D.UsageError(f"--resume: {key} is {now.get(key, _UNSET)!r} but the run in {cfg.run_dir} used "
                                   f"{then.get(key, _UNSET)!r}; resume with the same {key} or start a new run name")
        grown = [k for k in ("train.steps", "train.epochs") if now.get(k) != then.get(k)]
        return (f"padmoe: resume: {', '.join(f'{k} {then.get(k)} -> {now.get(k)}' for k in grown)}: the learning-rate "
                "schedule is stretched to the new length from the resumed step on") if grown else ""
    if exists or os.path.isdir(os.path.join(cfg.run_dir, "checkpoints")):
        raise D.UsageError(f"run directory {cfg.run_dir} already holds a run; pass --resume to continue it, or set "
                           "name=<new name> (or remove the folder if that run never reached a checkpoint)")
    return ""


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
    if not os.path.isfile(path):
        raise D.UsageError(f"rank {rank} does not see {path} that rank 0 wrote: the run folder must be on a "
                           "filesystem every rank shares; set output_dir to such a folder")
    return created


def tensorboard_files(run_dir: str) -> set[str]:
    found = set()
    for folder, _, files in os.walk(os.path.join(run_dir, "tensorboard")):
        found.update(os.path.join(folder, f) for f in files)
    return found


def remove_new_tensorboard_files(run_dir: str, before: set[str]) -> None:
    """After a resume that failed before its first step: the event files its engine created hold nothing."""
    for path in tensorboard_files(run_dir) - before:
        os.remove(path)


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


RECORD_CLOCK_KEYS = ("time_s",)
"""Record fields that measure, rather than decide, a partition: not compared on resume."""


def check_masks_match_partition(run_dir: str, model, record: dict) -> None:
    """The masks loaded from a checkpoint must be the run's partition (RUN_DIR/partition) and the two records the
    same: they cannot disagree. The model is not changed (a compacted layer's masks are fixed); a MoE-P partition's
    dropped static part (λs = 0, not in the model's state) is dropped again."""
    from pad_moe.pad.protocol import pad_modules
    from pad_moe.partition.persist import masks_differ, read_partition

    where = os.path.join(run_dir, "partition")
    try:
        _, saved = read_partition(where)
        differ = masks_differ(where, model)
    except ValueError as err:
        raise D.UsageError(f"--resume: the checkpoint has a partition record but {err}; restore {where} or start a "
                           "new run") from None
    decided = [k for k in record if k not in RECORD_CLOCK_KEYS]
    changed = [k for k in decided if saved.get(k) != record[k]]
    if differ or changed:
        what = f"masks {differ[:3]}" if differ else f"record fields {changed[:3]}"
        raise D.UsageError(f"--resume: the checkpoint's {what} differ from {where}; the run folder was altered: "
                           "resume from a copy that is intact or start a new run")
    if record.get("method") == "moe_p":
        for _, module in pad_modules(model):
            module.drop_static()


def gather_rank_major(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate a same-sized tensor from every rank, rank 0 first."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
