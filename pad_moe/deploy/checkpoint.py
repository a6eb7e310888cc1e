"""Read a pad_moe DeepSpeed checkpoint written at any world size and ep_size, without DeepSpeed's engine.

A checkpoint tag folder (``RUN_DIR/checkpoints/stepN``) holds

    mp_rank_00_model_states.pt                       every non-expert tensor (ours: static FFNs, layer masks, gates, φ)
    layer_{L}_expert_{E}_mp_rank_00_model_states.pt  one per MoE layer L (module order) and *global* expert id E;
                                                     keys already carry the global id (``...deepspeed_experts.{E}...``)
    zero_pp_rank_{r}_mp_rank_00_optim_states.pt      ZeRO-1/2 optimizer shard of data-parallel rank r
    expp_rank_{e}_mp_rank_00_optim_states.pt         without ZeRO: the optimizer of expert-parallel rank e
    rng_rank{r}.pt                                   pad_moe's RNG state per rank

Merging the model file with every expert file gives the full training-form state dict, in the key layout of a model
built with ``ep_size=1`` (local expert id == global id). Optimizer state is read per parameter (global names) from the
ZeRO shards' ``param_slice_mappings``, so it can be re-partitioned for another layout.

Every file is loaded with ``torch.load(weights_only=True)`` (ZeRO shards need three DeepSpeed classes allow-listed);
a missing, truncated or corrupt file, a ``latest`` naming no folder, or a folder whose step differs from its tag raise
:class:`CheckpointError` with one line naming the file.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from pad_moe.errors import UsageError

MODEL_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
EXPP_FILE = re.compile(r"^expp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")
GROUPED_PARAM = re.compile(r"^(.*\.deepspeed_moe\.experts\.)(\w+)_(weight|bias)$")
"""A parameter of the grouped expert store (pad_moe.moe.store): ``...deepspeed_moe.experts.fc1_weight`` (E_local, ...),
whose state-dict keys are the per-expert ``...deepspeed_moe.experts.deepspeed_experts.{i}.fc1.weight``."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be read as asked (missing / corrupt file, mismatched tag): one line, exit status 2."""


def safe_load(path: str, what: str = "file") -> Any:
    """torch.load(weights_only=True) with DeepSpeed's ZeRO bookkeeping classes allowed; errors as one line."""
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {what}: {path}")
    from pad_moe.checkpoint_io import checkpoint_safe_globals

    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors all mean the same thing here
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {first})") from None


@dataclass
class CheckpointRef:
    """Where a checkpoint lies: RUN_DIR (holding config.yaml), the checkpoints folder and one tag."""

    run_dir: str
    root: str
    tag: str

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.root, self.tag)


def locate(path: str, tag: Optional[str] = None, config: Optional[str] = None) -> CheckpointRef:
    """Resolve RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/TAG to one checkpoint (``latest`` by default)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if os.path.isfile(os.path.join(path, MODEL_FILE)) or glob.glob(os.path.join(path, "layer_*_expert_*")):
        root, found = os.path.dirname(path), os.path.basename(path)
        if tag is not None and tag != found:
            raise CheckpointError(f"--tag {tag} does not match the checkpoint folder {path} (tag {found})")
        tag = found
    else:
        root = path if os.path.isfile(os.path.join(path, "latest")) else os.path.join(path, "checkpoints")
        if tag is None:
            latest = os.path.join(root, "latest")
            if not os.path.isfile(latest):
                raise CheckpointError(f"{path} holds no DeepSpeed checkpoint (no {MODEL_FILE}, no checkpoints/latest)")
            with open(latest) as f:
                tag = f.read().strip()
            if not os.path.isdir(os.path.join(root, tag)):
                raise CheckpointError(f"mismatched tag: {latest} names {tag!r} but {os.path.join(root, tag)} does "
                                      "not exist; fix 'latest' or pass --tag")
        elif not os.path.isdir(os.path.join(root, tag)):
            raise CheckpointError(f"--tag {tag}: {os.path.join(root, tag)} does not exist")
    run_dir = os.path.dirname(root)
    if config is None:
        config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        raise CheckpointError(f"no run config next to the checkpoint ({config} is missing); pass --config RUN.yaml")
    return CheckpointRef(run_dir=run_dir, root=root, tag=tag)


@dataclass
class Checkpoint:
    """Everything export / consolidate / reshard need from one checkpoint tag."""

    ref: CheckpointRef
    cfg: Any
    """The run's RunConfig (as trained: its moe.ep_size is the checkpoint's)."""
    state: dict[str, torch.Tensor]
    """Full training-form state dict, expert keys with global ids (the ep_size=1 layout)."""
    meta: dict[str, Any]
    """Scalars of the model file: global_steps, lr_scheduler, dp_world_size, num_experts, client state (step, ...)."""
    world_size: int
    ep_size: int
    files: dict[str, list[str]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta.get("step", self.meta.get("global_steps", 0)))

    @property
    def record(self) -> Optional[dict]:
        """The partition record: client state of the checkpoint, else RUN_DIR/partition/record.json."""
        if self.meta.get("partition") is not None:
            return self.meta["partition"]
        path = os.path.join(self.ref.run_dir, "partition", "record.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return None


_META_KEYS = ("global_steps", "global_samples", "skipped_steps", "lr_scheduler", "dp_world_size", "mp_world_size",
              "num_experts", "ds_version", "step", "partition", "losses")


def read_checkpoint(path: str, tag: Optional[str] = None, config: Optional[str] = None) -> Checkpoint:
    """Read model states and every expert file of one tag into a full state dict with global expert ids."""
    from pad_moe.config import load_config

    ref = locate(path, tag, config)
    try:
        cfg = load_config(config or os.path.join(ref.run_dir, "config.yaml"))
    except ValueError as err:
        raise CheckpointError(f"run config of {ref.run_dir}: {err}") from None
    model_file = os.path.join(ref.tag_dir, MODEL_FILE)
    if not os.path.isfile(model_file):
        raise CheckpointError(f"missing model file: {model_file} (is {ref.tag_dir} a complete DeepSpeed checkpoint?)")
    top = safe_load(model_file, "model file")
    if not isinstance(top, dict) or not isinstance(top.get("module"), dict):
        raise CheckpointError(f"{model_file} is not a DeepSpeed model-states file (no 'module' state dict)")
    meta = {k: top.get(k) for k in _META_KEYS if k in top}
    if int(meta.get("mp_world_size") or 1) != 1:
        raise CheckpointError(f"{model_file}: tensor/model parallel checkpoints (mp_world_size="
                              f"{meta['mp_world_size']}) are not supported")
    _check_tag(ref, meta, model_file)

    state = dict(top["module"])
    num_experts = meta.get("num_experts") or []
    if not isinstance(num_experts, list):
        num_experts = [num_experts]
    expected = {(layer, e) for layer, n in enumerate(num_experts) for e in range(int(n))}
    found = {}
    for name in sorted(os.listdir(ref.tag_dir)):
        m = EXPERT_FILE.match(name)
        if m:
            if int(m.group(3)) != 0:
                raise CheckpointError(f"{name}: model-parallel expert files are not supported")
            found[(int(m.group(1)), int(m.group(2)))] = os.path.join(ref.tag_dir, name)
    for key in sorted(expected - set(found)):
        raise CheckpointError(f"missing expert file: {os.path.join(ref.tag_dir, _expert_name(*key))} "
                              f"({len(found)} of {len(expected)} expert files present)")
    for key in sorted(set(found) - expected):
        raise CheckpointError(f"unexpected expert file {found[key]}: the model file records {len(num_experts)} MoE "
                              f"layers with {num_experts} experts (mismatched files from another checkpoint?)")
    for (_layer, expert), file in sorted(found.items()):
        part = safe_load(file, "expert file")
        if not isinstance(part, dict) or not part:
            raise CheckpointError(f"{file} holds no expert tensors")
        for key, value in part.items():
            m = EXPERT_KEY.match(key)
            if m is None or int(m.group(2)) != expert:
                raise CheckpointError(f"{file}: key {key!r} is not a tensor of expert {expert} (mismatched file)")
            if key in state:
                raise CheckpointError(f"{file}: {key!r} also appears in another file of {ref.tag_dir}")
            state[key] = value
    world = int(meta.get("dp_world_size") or 1)
    ep = int(cfg.moe.ep_size)
    files = {"model": [model_file], "experts": [found[k] for k in sorted(found)],
             "zero": _rank_files(ref.tag_dir, ZERO_FILE), "expp": _rank_files(ref.tag_dir, EXPP_FILE)}
    return Checkpoint(ref=ref, cfg=cfg, state=state, meta=meta, world_size=world, ep_size=ep, files=files)


def _expert_name(layer: int, expert: int) -> str:
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def _rank_files(folder: str, pattern: re.Pattern) -> list[str]:
    hits = sorted(((int(m.group(1)), n) for n in os.listdir(folder) if (m := pattern.match(n))))
    return [os.path.join(folder, n) for _, n in hits]


def _check_tag(ref: CheckpointRef, meta: dict, model_file: str) -> None:
    m = re.fullmatch(r"step(\d+)", ref.tag)
    step = meta.get("step", meta.get("global_steps"))
    if m and step is not None and int(m.group(1)) != int(step):
        raise CheckpointError(f"mismatched tag: folder {ref.tag} holds the checkpoint of step {step} ({model_file})")


# -- optimizer state ------------------------------------------------------------------------------------------------
@dataclass
class OptimizerState:
    """Adam-style state per parameter (global names, parameter shapes) plus the scalars shared by all of them."""

    tensors: dict[str, dict[str, torch.Tensor]]
    """name -> {'exp_avg': ..., 'exp_avg_sq': ...} (whatever tensor keys the optimizer keeps)."""
    scalars: dict[str, Any]
    """e.g. {'step': tensor(6.)}: state entries that are not per-element."""
    fp32: dict[str, torch.Tensor]
    """fp32 master weights per parameter (ZeRO shards), to prefer over bf16/fp16 module weights."""
    source: str


def read_optimizer_state(ckpt: Checkpoint) -> Optional[OptimizerState]:
    """Per-parameter optimizer state of a ZeRO-1/2 checkpoint (None when there is no readable ZeRO state).

    Each shard's ``param_slice_mappings`` gives, per parameter group, the (start, numel) of every parameter fragment in
    that rank's flat partition; concatenating a parameter's fragments in rank order gives the whole parameter. Expert
    parameters are named with local ids on each rank: they are renamed to global ids with the rank's ep rank.
    """
    files = ckpt.files.get("zero") or []
    if not files:
        return None
    if len(files) != ckpt.world_size:
        raise CheckpointError(f"{ckpt.ref.tag_dir} has {len(files)} ZeRO optimizer shards, the model file records "
                              f"dp_world_size={ckpt.world_size} (missing or extra optim_states files)")
    n_local = _local_experts_per_rank(ckpt)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    scalars: dict[str, Any] = {}
    for rank, file in enumerate(files):
        shard = safe_load(file, "optimizer shard")
        osd = shard.get("optimizer_state_dict") if isinstance(shard, dict) else None
        if not isinstance(osd, dict) or "param_slice_mappings" not in osd:
            raise CheckpointError(f"{file} is not a ZeRO-1/2 optimizer shard with parameter mappings")
        offset = (rank % ckpt.ep_size) * n_local
        base = osd["base_optimizer_state"]
        group_states = base["state"] if isinstance(base, dict) else {i: s for i, s in enumerate(base)}
        for i, mapping in enumerate(osd["param_slice_mappings"]):
            flat = osd["single_partition_of_fp32_groups"][i]
            gstate = group_states.get(i, {})
            for key, value in gstate.items():
                if not (torch.is_tensor(value) and value.dim() > 0):
                    scalars.setdefault(key, value)
            for name, addr in mapping.items():
                # a grouped expert parameter (one per ep rank under the same name): split by expert below
                gname = f"{name}@{offset}" if GROUPED_PARAM.match(name) else _renumber(name, offset)
                slot = pieces.setdefault(gname, {})
                slot.setdefault("__fp32__", []).append(flat.narrow(0, addr.start, addr.numel))
                for key, value in gstate.items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        slot.setdefault(key, []).append(value.narrow(0, addr.start, addr.numel))
        steps = {int(s["step"]) for s in group_states.values() if torch.is_tensor(s.get("step", None))}
        want = int(ckpt.meta.get("global_steps") or 0) - int(ckpt.meta.get("skipped_steps") or 0)
        if steps and steps != {want}:
            raise CheckpointError(f"mismatched tag: {file} holds optimizer step {sorted(steps)[0]}, the model file "
                                  f"global_steps={ckpt.meta.get('global_steps')}")
    pieces = _per_expert(pieces, n_local, ckpt.state)
    tensors, fp32 = {}, {}
    for name, slot in pieces.items():
        if name not in ckpt.state:
            raise CheckpointError(f"optimizer shards name parameter {name!r} that the model files lack")
        shape = ckpt.state[name].shape
        for key, parts in slot.items():
            flat = torch.cat(parts)
            if flat.numel() != ckpt.state[name].numel():
                raise CheckpointError(f"optimizer shards hold {flat.numel()} values of {name!r}, expected "
                                      f"{ckpt.state[name].numel()} (shards from different runs?)")
            if key == "__fp32__":
                fp32[name] = flat.reshape(shape).clone()
            else:
                tensors.setdefault(name, {})[key] = flat.reshape(shape).clone()
    return OptimizerState(tensors=tensors, scalars=scalars, fp32=fp32, source="zero")


def grouped_expert_keys(name: str, first: int, n_local: int) -> list[str]:
    """The per-expert state-dict keys (global ids ``first`` ..) of grouped store parameter ``name``."""
    m = GROUPED_PARAM.match(name)
    return [f"{m.group(1)}deepspeed_experts.{first + i}.{m.group(2)}.{m.group(3)}" for i in range(n_local)]


def _per_expert(pieces: dict, n_local: int, state: dict) -> dict:
    """Optimizer pieces of grouped store parameters (``name@first``) split into the per-expert keys of ``state``."""
    out = {}
    for name, slot in pieces.items():
        if "@" not in name:
            out[name] = slot
            continue
        base, first = name.rsplit("@", 1)
        keys = grouped_expert_keys(base, int(first), n_local)
        missing = [k for k in keys if k not in state]
        if missing:
            raise CheckpointError(f"optimizer shards name grouped parameter {base!r}, the model files lack {missing[0]!r}")
        sizes = [state[k].numel() for k in keys]
        for key, parts in slot.items():
            flat = torch.cat(parts)
            if flat.numel() != sum(sizes):
                raise CheckpointError(f"optimizer shards hold {flat.numel()} values of {base!r}, expected "
                                      f"{sum(sizes)} (shards from different runs?)")
            for k, part in zip(keys, torch.split(flat, sizes)):
                out.setdefault(k, {})[key] = [part]
    return out


def _local_experts_per_rank(ckpt: Checkpoint) -> int:
    num = ckpt.meta.get("num_experts") or [ckpt.cfg.moe.num_experts]
    num = num if isinstance(num, list) else [num]
    return int(num[0]) // ckpt.ep_size if num else 0


def _renumber(key: str, offset: int) -> str:
    m = EXPERT_KEY.match(key)
    return key if m is None or not offset else f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"


def local_expert_state(state: dict, num_local: int, ep_rank: int) -> dict:
    """The part of a full (global-id) state dict that ep rank ``ep_rank`` holds, expert keys renumbered to local ids."""
    first, out = ep_rank * num_local, {}
    for key, value in state.items():
        m = EXPERT_KEY.match(key)
        if m is None:
            out[key] = value
        elif first <= int(m.group(2)) < first + num_local:
            out[_renumber(key, -first)] = value
    return out


def with_ep_size(cfg, ep_size: int, **top):
    """A copy of RunConfig ``cfg`` with moe.ep_size (and top-level fields such as name/output_dir) replaced."""
    return replace(cfg, moe=replace(cfg.moe, ep_size=ep_size), **top)


# -- writing --------------------------------------------------------------------------------------------------------
def check_new_path(out: str, empty_dir_ok: bool = False, what: str = "output") -> str:
    """``out`` (absolute) if a new file or folder can be made there: it does not exist (or, with ``empty_dir_ok``, is
    an empty folder) and its nearest existing parent is a folder this process may write into."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) or os.path.islink(out):
        if not (empty_dir_ok and os.path.isdir(out) and not os.listdir(out)):
            raise UsageError(f"--out {out} already exists{' and is not empty' if empty_dir_ok else ''} (it may hold a "
                             f"{what}); choose a new {'folder' if empty_dir_ok else 'path'}, nothing was written")
        return out
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the folder {parent} is not writable; choose another --out")
    return out


def make_parents(path: str) -> list[str]:
    """Create the missing parent folders of ``path``; returns them, deepest first (for ``remove_dirs``)."""
    created, parent = [], os.path.dirname(path)
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    for folder in reversed(created):
        os.mkdir(folder)
    return created


def remove_dirs(folders: list[str]) -> None:
    """Remove folders ``make_parents`` created, as long as they are still empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break


class AtomicDir:
    """Write a folder completely or not at all: ``with AtomicDir(out) as tmp: ...`` writes into a temporary folder
    next to ``out`` and renames it to ``out`` only when the block finishes; on any error the temporary folder is removed
    and an existing ``out`` is never touched. ``out`` must not exist or be an empty folder."""

    def __init__(self, out: str, what: str = "output"):
        self.out = check_new_path(out, empty_dir_ok=True, what=what)
        self.tmp: Optional[str] = None
        self.created: list[str] = []

    def __enter__(self) -> str:
        import tempfile

        self.created = make_parents(self.out)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.tmp-", dir=os.path.dirname(self.out))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            remove_dirs(self.created)  # the parents this write made
            return False
        umask = os.umask(0)
        os.umask(umask)
        for folder, _, names in os.walk(self.tmp):  # mkdtemp's 0700 -> the usual permissions
            os.chmod(folder, 0o777 & ~umask)
            for name in names:
                path = os.path.join(folder, name)
                os.chmod(path, (0o777 if os.stat(path).st_mode & 0o100 else 0o666) & ~umask)
        if os.path.isdir(self.out):
            os.rmdir(self.out)  # empty, checked in __init__
        os.replace(self.tmp, self.out)
        return False
