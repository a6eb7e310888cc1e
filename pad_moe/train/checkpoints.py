"""Crash-safe checkpoints: a checkpoint becomes ``latest`` only when every rank has written every file of it.

    RUN_DIR/checkpoints/stepN/                     DeepSpeed's files + ``rng_rank{r}.pt`` of every rank
    RUN_DIR/checkpoints/stepN/pad_moe_manifest.json  written by rank 0 after all ranks finished: step, world size,
                                                   size and sha256 of every file (the "complete" mark)
    RUN_DIR/checkpoints/latest                     names the newest complete checkpoint; replaced atomically, last

A save that dies at any moment leaves the previous complete checkpoint (and ``latest``) as they were. ``--resume``
verifies the checkpoint ``latest`` names against its manifest and falls back to the newest complete one, saying so in
one line. Only the newest ``keep`` complete checkpoints are kept.

Fault injection for tests: ``PAD_MOE_FAULT_SAVE=stage:rank:step`` kills that rank at that stage of that save
(stages in ``SAVE_STAGES``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from pad_moe import distributed as D
from pad_moe.manifest import FORMAT_VERSION, MANIFEST, check_files  # noqa: F401 - FORMAT_VERSION re-exported
from pad_moe.manifest import write_manifest as write_folder_manifest

LATEST = "latest"
FAULT_ENV = "PAD_MOE_FAULT_SAVE"
SAVE_STAGES = ("engine", "rng", "manifest", "latest")
"""engine: DeepSpeed's files written, RNG not yet | rng: this rank's files all written, manifest not yet |
manifest: manifest written, ``latest`` not yet moved | latest: ``latest`` moved, old checkpoints not yet pruned."""
_TAG = re.compile(r"^step(\d+)$")
_EXPERT_FILE = re.compile(r"^layer_\d+_expert_\d+_mp_rank_\d+_model_states\.pt$")


def _fault(stage: str, rank: int, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{stage}:{rank}:{step}":
        sys.stderr.flush()
        os._exit(17)  # a hard crash: no cleanup, no exception handlers


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_of(step: int) -> str:
    return f"step{step}"


def write_manifest(tag_dir: str, step: int, world: int) -> None:
    """Mark ``tag_dir`` complete: the size and sha256 of every file in it (call once all ranks have written)."""
    from pad_moe.moe.store import STORE_VERSION

    write_folder_manifest(tag_dir, step=step, world_size=world, expert_store=STORE_VERSION)


def point_latest(root: str, tag: str) -> None:
    _atomic_write(os.path.join(root, LATEST), tag)


def verify(tag_dir: str) -> tuple[Optional[dict], str]:
    """(manifest, "") for a complete, intact checkpoint folder; (None, why) otherwise."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isdir(tag_dir):
        return None, "its folder does not exist"
    if not os.path.isfile(path):
        return None, "it has no manifest (its save did not finish, or pad_moe < 0.2 wrote it)"
    try:
        with open(path) as f:
            manifest = json.load(f)
        files, step, world = manifest["files"], int(manifest["step"]), int(manifest["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"its manifest is unreadable ({type(err).__name__})"
    why = check_files(tag_dir, files)
    if why:
        return None, why
    manifest["step"], manifest["world_size"] = step, world
    return manifest, ""


@dataclass
class ResumePoint:
    tag: str
    step: int
    world_size: int
    note: str
    """Empty when ``latest`` was loadable; else the one line that says why an older checkpoint is used."""


def _step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, tag) of every step folder, newest first."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        m = _TAG.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), name))
    return sorted(found, reverse=True)


def _read_latest(root: str) -> Optional[str]:
    """The tag ``latest`` names, if it names a step folder (anything else, e.g. ``../x``, is ignored)."""
    try:
        with open(os.path.join(root, LATEST)) as f:
            tag = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if _TAG.match(tag) else None


def find_resume_point(root: str, world: int) -> ResumePoint:
    """The checkpoint a ``--resume`` loads: the newest one that verifies against its manifest (normally the one
    ``latest`` names; newer folders are saves that did not finish). Every rank reaches the same answer from the same
    files, so no collective is needed."""
    named = _read_latest(root)
    candidates = [t for _, t in _step_dirs(root)]
    if named is not None and named not in candidates:
        candidates.insert(0, named)
    skipped = []
    for tag in candidates:
        manifest, why = verify(os.path.join(root, tag))
        if manifest is None:
            skipped.append(f"{tag}: {why}")
            continue
        _check_expert_store(os.path.join(root, tag), manifest, world)
        if manifest["world_size"] != world:
            raise D.UsageError(
                f"--resume: checkpoint {os.path.join(root, tag)} was written by {manifest['world_size']} ranks, this "
                f"launch has {world}; launch {manifest['world_size']} ranks, or write a run for {world} with "
                f"'padmoe reshard {root} --ep E --world {world} --out DIR'")
        note = ""
        if skipped:
            note = f"padmoe: resume: skipping {'; '.join(skipped)}; resuming from {tag}, the newest complete checkpoint"
        elif tag != named:
            said = f"'latest' names {named!r}" if named else "there is no valid 'latest'"
            note = f"padmoe: resume: {tag} is complete but {said} (the save ended before moving it); resuming from {tag}"
        return ResumePoint(tag, manifest["step"], world, note)
    detail = "; ".join(skipped) if skipped else "no step folders"
    raise D.UsageError(f"--resume: no complete checkpoint under {root} ({detail}); start the run again under a new "
                       "name")


def _check_expert_store(tag_dir: str, manifest: dict, world: int) -> None:
    """Refuse a checkpoint of MoE layers written before the grouped expert store: its ZeRO optimizer state is laid out
    expert module by expert module, and loading it into the grouped parameters would misplace every moment."""
    from pad_moe.moe.store import STORE_VERSION

    version = manifest.get("expert_store", 1)
    has_experts = any(_EXPERT_FILE.match(name) for name in manifest.get("files", {}))
    if has_experts and version != STORE_VERSION:
        raise D.UsageError(
            f"--resume: checkpoint {tag_dir} was written with expert store version {version} (per-expert modules), "
            f"this pad_moe resumes version {STORE_VERSION} (grouped experts); convert it with 'padmoe reshard "
            f"{tag_dir} --ep EP --world {world} --out NEW_RUN' and resume NEW_RUN")


def save(engine, root: str, step: int, rank: int, world: int, client_state: dict, keep: int) -> None:
    """Write checkpoint ``stepN`` on every rank, then (rank 0) its manifest, then move ``latest``, then prune."""
    tag = tag_of(step)
    tag_dir = os.path.join(root, tag)
    if rank == 0 and os.path.isdir(tag_dir):  # left by a save that crashed (or from before a resume): never complete
        shutil.rmtree(tag_dir)
    D.barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)  # ends with a barrier
    _fault("engine", rank, step)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rng_path = os.path.join(tag_dir, f"rng_rank{rank}.pt")
    torch.save(rng, rng_path + ".tmp")
    os.replace(rng_path + ".tmp", rng_path)
    _fault("rng", rank, step)
    D.barrier()  # every rank has written every file of this checkpoint
    if rank == 0:
        unseen = [r for r in range(world) if not os.path.isfile(os.path.join(tag_dir, f"rng_rank{r}.pt"))]
        if unseen:
            raise D.UsageError(f"rank 0 does not see the files ranks {unseen} wrote to {tag_dir}: the run folder must "
                               "be on a filesystem every rank shares; set output_dir to such a folder")
        write_manifest(tag_dir, step, world)
        _fault("manifest", rank, step)
        point_latest(root, tag)
        _fault("latest", rank, step)
        prune(root, keep)
    D.barrier()


def prune(root: str, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints (0: keep all) and every incomplete one older than
    ``latest``; the checkpoint ``latest`` names is never removed."""
    named = _read_latest(root)
    named_step = int(_TAG.match(named).group(1)) if named and _TAG.match(named) else None
    complete = 0
    for step, tag in _step_dirs(root):
        path = os.path.join(root, tag)
        if tag == named:
            complete += 1
            continue
        if named_step is not None and step > named_step:
            continue  # newer than latest: a save in flight or a crash; a resume decides about it
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            shutil.rmtree(path, ignore_errors=True)
            continue
        complete += 1
        if keep and complete > keep:
            shutil.rmtree(path, ignore_errors=True)


def load(engine, root: str, point: ResumePoint, rank: int) -> dict:
    """Load ``point`` into the engine (every file with weights_only=True) and this rank's RNG; returns the client
    state. A file that will not load safely is one line naming it."""
    import pickle

    try:
        path, client = engine.load_checkpoint(root, tag=point.tag)
    except (pickle.UnpicklingError, EOFError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise D.UsageError(f"--resume: checkpoint {os.path.join(root, point.tag)} cannot be read "
                           f"({type(err).__name__}: {first}); resume from another checkpoint or start a new run") \
            from None
    except (RuntimeError, KeyError, TypeError) as err:  # the files are safe but do not fit this model / layout
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise D.UsageError(f"--resume: checkpoint {os.path.join(root, point.tag)} does not fit the model this config "
                           f"builds ({type(err).__name__}: {first}); resume with the run's own config") from None
    if path is None or client is None:
        raise D.UsageError(f"--resume: DeepSpeed found nothing to load in {os.path.join(root, point.tag)}")
    rng_path = os.path.join(root, point.tag, f"rng_rank{rank}.pt")
    resharded = os.path.isfile(os.path.join(os.path.dirname(root), "reshard.json"))
    if not os.path.isfile(rng_path) and not resharded:  # only ranks a reshard added have none (reshard.json says so)
        raise D.UsageError(f"--resume: {rng_path} is missing: this rank's random state is lost, the resume would not "
                           "be exact; resume from another checkpoint")
    if os.path.isfile(rng_path):
        rng = D.weights_only_load(rng_path)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return client
