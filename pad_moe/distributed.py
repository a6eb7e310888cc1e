"""DeepSpeed glue, in one place: process groups, the DeepSpeed config a run uses, the engine, small collectives.

Model code never imports torch.distributed; everything that knows about ranks lives here (and in the partition's
collectives module).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from pad_moe.checkpoint_io import weights_only_load
from pad_moe.config import RunConfig
from pad_moe.errors import UsageError  # re-exported: D.UsageError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def init_distributed() -> tuple[int, int]:
    """Initialise DeepSpeed comm (gloo on CPU, nccl on CUDA) when launched with ranks; return (rank, world)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())  # one process without a launcher: any free port
        os.environ.setdefault("MASTER_PORT", "29512")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        clear_stale_build_locks()
        prefer_environment_ninja()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        release_shm_buffer_name()
    return dist.get_rank(), dist.get_world_size()


STALE_LOCK_S = 900
"""A JIT-build lock this old belongs to a build that died (DeepSpeed's CPU ops build in 1-4 minutes here)."""


def clear_stale_build_locks(root: Optional[str] = None, now: Optional[float] = None) -> list[str]:
    """Remove the locks of torch-extension builds whose process died (Ctrl-C or a kill while DeepSpeed JIT-built
    its CPU comm op leaves ``<ext>/lock`` behind, and every later run then waits on it forever, silently). A lock is
    stale when it is older than ``STALE_LOCK_S`` and the build's library is already there. Says so in one line."""
    import sys
    import time

    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    removed = []
    now = time.time() if now is None else now
    folders = [os.path.join(root, a, b) for a in (sorted(os.listdir(root)) if os.path.isdir(root) else [])
               if os.path.isdir(os.path.join(root, a)) for b in sorted(os.listdir(os.path.join(root, a)))]
    for folder in folders:  # ROOT/py311_cpu/deepspeed_shm_comm/lock
        lock = os.path.join(folder, "lock")
        try:
            stale = now - os.path.getmtime(lock) > STALE_LOCK_S
        except OSError:
            continue
        if stale and any(f.endswith(".so") for f in os.listdir(folder)):
            try:
                os.remove(lock)
            except OSError:
                continue
            removed.append(lock)
            print(f"pad_moe: removed the stale build lock {lock} (left by a build that was killed)", file=sys.stderr)
    return removed


def prefer_environment_ninja(executable: Optional[str] = None) -> bool:
    """Put the running interpreter's bin folder first on PATH when it holds a ``ninja``: DeepSpeed JIT-builds its CPU
    comm op with whichever ninja PATH finds first, and two ninja versions (the pip one in the venv, the system one)
    hash the build commands differently, so runs started with and without the venv activated rebuilt the op each
    time they alternated (1-4 minutes each, under a lock every other run waits on). True when PATH changed."""
    import sys

    bin_dir = os.path.dirname(executable or sys.executable)
    if not os.path.isfile(os.path.join(bin_dir, "ninja")):
        return False
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] == [bin_dir]:
        return False
    os.environ["PATH"] = os.pathsep.join([bin_dir, *(p for p in path if p != bin_dir)])
    return True


def shm_buffer_path(rank: int) -> str:
    """Where DeepSpeed's CPU shared-memory all-reduce keeps this rank's buffer (ops/csrc/cpu/comm/shm.cpp names it by
    uid, MASTER_ADDR, MASTER_PORT and rank)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer_name() -> None:
    """Unlink this rank's DeepSpeed shm buffer once every rank has mapped every buffer (DeepSpeed never does: each
    run on a new port left 66 MiB per rank in /dev/shm, i.e. in RAM, until reboot). The mappings stay valid; the
    memory goes back to the system when the processes exit, even when they crash."""
    import torch.distributed as dist

    if not hasattr(os, "getuid") or torch.cuda.is_available():
        return
    dist.barrier()  # DeepSpeed's init opens the other ranks' buffers before it returns
    try:
        os.unlink(shm_buffer_path(dist.get_rank()))
    except FileNotFoundError:
        pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def expert_parallel_rank(rank: int, world: int, ep_size: int) -> int:
    """This rank's position in its expert-parallel group (DeepSpeed's layout: consecutive ranks form a group)."""
    if world % ep_size:
        raise UsageError(f"moe.ep_size={ep_size} does not divide the world size {world}; launch a multiple of "
                         f"{ep_size} ranks or set moe.ep_size to a divisor of {world}")
    return rank % ep_size


def load_ds_json(path: str) -> dict[str, Any]:
    resolved = path if os.path.isabs(path) or os.path.exists(path) else os.path.join(REPO_ROOT, path)
    if not os.path.isfile(resolved):
        raise UsageError(f"train.ds_config={path!r} does not exist; use one of configs/ds_zero*.json")
    with open(resolved) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise UsageError(f"train.ds_config={path!r} is not valid JSON: {err}") from None


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def build_ds_config(cfg: RunConfig, world: int, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: the JSON file plus batch sizes, precision, optimizer, schedule and monitor,
    all taken from the run config (so batch size and learning rate are set in exactly one place)."""
    ds = load_ds_json(cfg.train.ds_config)
    present = [k for k in BATCH_KEYS if k in ds]
    if present:
        raise UsageError(f"{cfg.train.ds_config} sets {present[0]}; batch sizes come from train.micro_batch_size and "
                         "train.grad_accum only: remove it from the JSON")
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * world
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if t.zero_stage is not None:
        zero["stage"] = t.zero_stage
    if cfg.model.arch != "vision" and cfg.moe.mode != "static" and zero.get("stage", 0) > 2:
        raise UsageError(f"ZeRO stage {zero['stage']} does not support DeepSpeed's native MoE layers; set "
                         "train.zero_stage to 0, 1 or 2 (ZeRO-3 MoE: HF MoE models through pad_moe.moe.autoep)")
    if t.dtype == "fp16" and not torch.cuda.is_available():
        raise UsageError("train.dtype=fp16 needs a GPU; use bf16 or fp32 on CPU")
    ds["bf16"] = {"enabled": t.dtype == "bf16"}
    ds["fp16"] = {"enabled": t.dtype == "fp16", "initial_scale_power": 12}
    if t.optimizer == "adamw":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-6,
                                                       "weight_decay": t.weight_decay, "torch_adam": True,
                                                       "fused": True}}  # one pass per step (CPU: 8x the default)
    else:  # torch SGD as a client optimizer (initialize_engine builds it)
        ds.pop("optimizer", None)
        ds["zero_allow_untested_optimizer"] = True
    warmup = max(1, int(round(t.warmup_ratio * total_steps)))  # DeepSpeed needs at least one warmup step
    total = max(total_steps, warmup + 1)
    if t.schedule == "linear":
        ds["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": total, "warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_num_steps": warmup,
            "warmup_type": "linear"}}
    else:
        ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": total, "warmup_min_ratio": 0.0, "warmup_num_steps": warmup, "cos_min_ratio": 0.0,
            "warmup_type": "linear"}}
    ds["steps_per_print"] = 10**9  # pad_moe logs by itself
    tb = ds.get("tensorboard", {})
    if tb.get("enabled", True):
        ds["tensorboard"] = {"enabled": True, "output_path": os.path.join(cfg.run_dir, "tensorboard"),
                             "job_name": tb.get("job_name", "train")}
    return ds


def check_ds_config(ds: dict[str, Any], path: str) -> None:
    """Parse ``ds`` as DeepSpeed will at initialize, so that a bad key is one line before anything is created."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ckpt = ds.get("checkpoint") or {}
    refused = {"use_node_local_storage": "pad_moe's checkpoints need one folder every rank shares",
               "load_universal": "universal checkpoints load with weights_only=False",
               "writer": "only DeepSpeed's torch checkpoint engine can be made to load with weights_only=True"}
    for key, why in refused.items():
        if isinstance(ckpt, dict) and ckpt.get(key):
            raise UsageError(f"train.ds_config={path!r} sets checkpoint.{key}: {why}; remove it from the JSON")
    try:
        DeepSpeedConfig(json.loads(json.dumps(ds)))
    except Exception as err:  # noqa: BLE001 - pydantic ValidationError, DeepSpeedConfigError, assertion errors
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or [type(err).__name__]
        raise UsageError(f"train.ds_config={path!r} is not a valid DeepSpeed config: {' / '.join(lines[:3])[:300]}; "
                         "fix that key in the JSON") from None


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups (no decay for biases, norms, φ and masks' neighbours), split into MoE / non-MoE groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])


def initialize_engine(model: torch.nn.Module, cfg: RunConfig, world: int, total_steps: int,
                      ds: dict[str, Any] | None = None):
    """deepspeed.initialize with pad_moe's config (``ds``: one already built by build_ds_config); returns (engine,
    ds_config). The engine loads checkpoints with weights_only=True."""
    import deepspeed

    ds = build_ds_config(cfg, world, total_steps) if ds is None else ds
    groups = param_groups(model, cfg.train.weight_decay)
    optimizer = None
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=None if optimizer else groups,
                                           optimizer=optimizer, config=ds)
    use_weights_only_checkpoints(engine)
    return engine, ds


def fine_tuning_engine(model: torch.nn.Module, params: list, micro_batch: int, lr: float):
    """A plain data-parallel DeepSpeed engine (ZeRO 0, fp32, AdamW without decay, gradient clipping 1.0) that trains
    only ``params``; the gradients are averaged over all ranks (``padmoe compress --heal-steps``)."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "steps_per_print": 10**9, "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    use_weights_only_checkpoints(engine)
    return engine


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce when distributed; identity in one process."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                    "min": dist.ReduceOp.MIN}[op], group=group)
    return tensor


def gather_expert_rows(layer, rows: torch.Tensor) -> torch.Tensor:
    """(E, P) rows of every expert of an expert-parallel MoE layer, in global expert order, from this rank's
    (E_local, P) rows; all-gathered over the layer's expert-parallel group (identity when it has one rank)."""
    import torch.distributed as dist

    group = layer.moe.deepspeed_moe.ep_group
    if not dist.is_initialized() or group is None or dist.get_world_size(group) == 1:
        return rows
    n = dist.get_world_size(group)
    ids = torch.tensor(layer.global_expert_ids, dtype=torch.long, device=rows.device)
    all_rows, all_ids = [torch.empty_like(rows) for _ in range(n)], [torch.empty_like(ids) for _ in range(n)]
    dist.all_gather(all_rows, rows.contiguous(), group=group)
    dist.all_gather(all_ids, ids, group=group)
    order = torch.cat(all_ids).argsort()
    return torch.cat(all_rows)[order]


def all_equal(value: str) -> bool:
    """Whether every rank passed the same string (True in one process)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == value for v in values)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def attach_expert_groups(model: torch.nn.Module) -> None:
    """Give every DeepSpeed MoE layer its expert-parallel group before an engine exists (IMP runs before the engine)."""
    from deepspeed.moe.layer import MoE

    for module in model.modules():
        if isinstance(module, MoE) and module.deepspeed_moe.ep_group is None:
            module.set_deepspeed_parallelism()


def detach_expert_groups(model: torch.nn.Module) -> None:
    """Undo attach_expert_groups so that deepspeed.initialize can attach the groups itself (it asserts none is set)."""
    from deepspeed.moe.layer import MoE

    for module in model.modules():
        if isinstance(module, MoE):
            module.deepspeed_moe.ep_group = None
            module.deepspeed_moe.gate.ep_group = None


def use_weights_only_checkpoints(engine) -> None:
    """Make the engine load every checkpoint file with weights_only=True (DeepSpeed's torch engine passes
    weights_only=False: a tampered checkpoint could run code). Saving is unchanged."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise UsageError(f"the DeepSpeed checkpoint engine {type(current).__name__} cannot be made to load with "
                         "weights_only=True; remove checkpoint.writer from train.ds_config")

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return weights_only_load(path, map_location)

    current.__class__ = WeightsOnlyCheckpointEngine


def memory_report(engine) -> dict[str, int]:
    """This rank's model-state bytes (parameters, fp32 master partitions, optimizer state, gradient partitions) of the
    engine as it is now, and the process's resident memory now and at its peak (Linux; 0 elsewhere)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in engine.module.parameters():
        add(p)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for flat in getattr(opt, "single_partition_of_fp32_groups", []):
        add(flat)
        add(getattr(flat, "grad", None))
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            add(value)
    rss = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in rss:
                    rss[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"state_bytes": total, "rss_bytes": rss["VmRSS"], "rss_peak_bytes": rss["VmHWM"]}


def check_rebuildable(ds: dict[str, Any], cfg: RunConfig) -> None:
    """Before anything is created: the engine can be rebuilt mid-run only where optimizer_snapshot can read it."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage in (1, 2) or (stage == 0 and cfg.train.dtype == "fp32"):
        return
    raise UsageError(f"moe.compact=true with partition.warmup_steps={cfg.partition.warmup_steps} rebuilds the engine "
                     f"after the warm-up partition, which needs ZeRO 1 or 2 (or ZeRO 0 in fp32); this run has ZeRO "
                     f"{stage} with train.dtype={cfg.train.dtype}: set train.zero_stage=2")


# -- rebuilding the engine around a changed model (in-place compaction after warm-up) -----------------------------
def optimizer_snapshot(engine) -> dict[str, Any]:
    """Every trainable parameter's full fp32 master and optimizer-state tensors, by name, plus each optimizer group's
    scalar state (Adam's step) and the engine's counters: what ``restore_optimizer`` puts into a new engine. ZeRO 1/2
    (gathered over each parameter's data-parallel group: call on every rank) or ZeRO 0 in fp32."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt, zero = engine.optimizer, engine.zero_optimization_stage()
    params: dict[str, dict[str, torch.Tensor]] = {}
    if zero in (1, 2):
        inner = opt.optimizer
        flats = opt.single_partition_of_fp32_groups
        keys = [sorted(k for k, v in inner.state.get(f, {}).items() if torch.is_tensor(v) and v.shape == f.shape)
                for f in flats]
        scalars = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in inner.state.get(f, {}).items()
                    if k not in keys[i]} for i, f in enumerate(flats)]
        # DeepSpeed links the parameters' optimizer-state fragments once, possibly before the first step made the
        # state: link them again now that it exists.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
        for i, group in enumerate(opt.bit16_groups):
            for p in group:
                # on the host: the device holds no second copy of the model state while the new engine is built
                entry = {"fp32": safe_get_full_fp32_param(p).detach().to("cpu", copy=True)}
                entry.update({k: safe_get_full_optimizer_state(p, k).detach().to("cpu", copy=True) for k in keys[i]})
                params[id(p)] = entry
    elif zero == 0 and isinstance(opt, torch.optim.Optimizer) and all(
            p.dtype == torch.float32 for g in opt.param_groups for p in g["params"]):
        scalars = []
        for group in opt.param_groups:
            state = opt.state.get(group["params"][0], {}) if group["params"] else {}
            scalars.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()
                            if not (torch.is_tensor(v) and v.dim() > 0)})
            for p in group["params"]:
                entry = {"fp32": p.detach().to("cpu", copy=True)}
                entry.update({k: v.detach().to("cpu", copy=True) for k, v in opt.state.get(p, {}).items()
                              if torch.is_tensor(v) and v.shape == p.shape})
                params[id(p)] = entry
    else:
        raise UsageError(f"rebuilding the engine (moe.compact after partition.warmup_steps) needs ZeRO 1 or 2, or ZeRO 0 "
                         f"in fp32; this run has ZeRO {zero} with {type(opt).__name__}: set train.zero_stage=2")
    by_name = {name: params[id(p)] for name, p in engine.module.named_parameters() if id(p) in params}
    lr = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    group_lrs = [g["lr"] for g in engine.optimizer.param_groups]  # set by the last scheduler step
    return {"params": by_name, "group_scalars": scalars, "lr_scheduler": lr, "group_lrs": group_lrs,
            "counters": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps",
                                                          "micro_steps")}}


def restore_optimizer(engine, snapshot: dict[str, Any], select) -> None:
    """Put ``snapshot`` into a freshly built engine whose parameters may be narrower: ``select(name, param, tensor)``
    maps a snapshot tensor onto the new parameter (identity, or the kept units of a compacted one)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt, zero = engine.optimizer, engine.zero_optimization_stage()
    saved = snapshot["params"]
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    missing = [n for n, _ in named if n not in saved]
    if missing:
        raise RuntimeError(f"rebuilt engine: no saved optimizer state for {missing[:3]}")
    if zero in (1, 2):
        inner, flats = opt.optimizer, opt.single_partition_of_fp32_groups
        if len(flats) != len(snapshot["group_scalars"]):
            raise RuntimeError(f"rebuilt engine has {len(flats)} optimizer groups, the old one "
                               f"{len(snapshot['group_scalars'])}")
        keys = sorted({k for entry in saved.values() for k in entry if k != "fp32"})
        for flat, scalars in zip(flats, snapshot["group_scalars"]):  # Adam's state exists only after a step: make it
            inner.state[flat] = {**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()},
                                 **{k: torch.zeros_like(flat) for k in keys}}
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
        for name, p in named:
            for key, value in saved[name].items():
                value = select(name, p, value).to(p.device)
                if key == "fp32":
                    safe_set_full_fp32_param(p, value)
                else:
                    safe_set_full_optimizer_state(p, value, key)
    else:
        names = {id(p): n for n, p in named}
        for group, scalars in zip(opt.param_groups, snapshot["group_scalars"]):
            for p in group["params"]:
                name = names[id(p)]
                entry = {k: select(name, p, v).to(p.device) for k, v in saved[name].items()}
                with torch.no_grad():
                    p.copy_(entry.pop("fp32"))
                if entry:
                    opt.state[p] = {**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()},
                                    **entry}
    if snapshot["lr_scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(snapshot["lr_scheduler"])
    for group, lr in zip(engine.optimizer.param_groups, snapshot["group_lrs"]):
        group["lr"] = lr
    for key, value in snapshot["counters"].items():
        setattr(engine, key, value)
