"""``padmoe consolidate``: the full training-form weights of an expert-parallel checkpoint in one safetensors file, and
the single-process training-form model built from them (all experts local, global ids, no DeepSpeed engine).

DeepSpeed's ``zero_to_fp32`` and universal checkpoints do not handle MoE checkpoints; this reads the model file and
every ``layer_*_expert_*`` file itself (see :mod:`pad_moe.deploy.checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Optional

import torch
from torch import nn

from pad_moe.deploy.checkpoint import (
    AtomicDir,
    Checkpoint,
    CheckpointError,
    check_new_path,
    make_parents,
    read_checkpoint,
    read_optimizer_state,
    remove_dirs,
    with_ep_size,
)

CONSOLIDATED_FILE = "model.safetensors"
CONSOLIDATED_META = "consolidated.json"


def prepare_pad_modules(model: nn.Module, state: dict, cfg, record: Optional[dict]) -> None:
    """What a strict load needs before it: MoE-P's dropped static part, masks, and neuron compaction (which changes
    weight shapes). ``state`` uses the key layout of ``model``."""
    from pad_moe.pad.protocol import pad_modules

    drop = (record or {}).get("method") == "moe_p"  # λs = 0 is not part of the model's state
    for name, module in pad_modules(model):
        if drop:
            module.drop_static(True)
        if cfg.moe.compact:
            with torch.no_grad():
                for bname, buf in module.named_buffers(recurse=False):
                    key = f"{name}.{bname}" if name else bname
                    if key not in state or tuple(state[key].shape) != tuple(buf.shape):
                        raise CheckpointError(f"checkpoint lacks mask {key} of compacted layer {name}")
                    buf.copy_(state[key])
            module.compact_()


def build_training_model(cfg, state: dict, *, ep_size: int = 1, ep_rank: int = 0,
                         record: Optional[dict] = None) -> nn.Module:
    """The run's model (``build_job``) for (ep_size, ep_rank), with ``state`` (this rank's keys) loaded strictly."""
    return build_training_job(cfg, state, ep_size=ep_size, ep_rank=ep_rank, record=record).model


def build_training_job(cfg, state: dict, *, ep_size: int = 1, ep_rank: int = 0, record: Optional[dict] = None):
    """``build_job`` for (ep_size, ep_rank) with ``state`` loaded strictly into its model; returns the Job."""
    from pad_moe.train.job import build_job

    cfg = with_ep_size(cfg, ep_size)
    job = build_job(cfg, ep_rank)
    model = job.model
    prepare_pad_modules(model, state, cfg, record)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"checkpoint does not fit the run's model ({detail[:200]})") from None
    return job


def load_training_form(checkpoint_dir: str, tag: Optional[str] = None, config: Optional[str] = None) -> nn.Module:
    """The training-form model of a checkpoint in one process (ep_size=1, every expert local), in eval mode."""
    ckpt = read_checkpoint(checkpoint_dir, tag, config)
    return build_training_model(ckpt.cfg, full_weights(ckpt), record=ckpt.record).eval()


def full_weights(ckpt: Checkpoint, prefer_fp32_master: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint's full state dict; parameters stored in bf16/fp16 are replaced by the ZeRO fp32 masters."""
    state = dict(ckpt.state)
    low = [k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32]
    if prefer_fp32_master and low:
        opt = read_optimizer_state(ckpt)
        if opt is not None:
            for k in low:
                if k in opt.fp32:
                    state[k] = opt.fp32[k]
    return state


def consolidate(checkpoint_dir: str, out: str, *, tag: Optional[str] = None, config: Optional[str] = None,
                dtype: Optional[str] = None) -> dict:
    """Write the full weights (all experts, global ids) to ``out`` (a .safetensors file, or a folder that then holds
    model.safetensors, consolidated.json and config.yaml). Returns the summary written to consolidated.json."""
    from safetensors.torch import save_file

    from pad_moe.config import save_config

    single = os.path.abspath(out).endswith(".safetensors")
    writer = None if single else AtomicDir(out, "model")  # refuse an unusable --out before reading anything
    if single:
        check_new_path(out, what="model")
    ckpt = read_checkpoint(checkpoint_dir, tag, config)
    state = full_weights(ckpt)
    build_training_model(ckpt.cfg, state, record=ckpt.record)  # validates every key and shape
    if dtype is not None:
        cast = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
    summary = {"format": "pad_moe.consolidated", "version": 1, "checkpoint": ckpt.ref.tag_dir, "tag": ckpt.ref.tag,
               "step": ckpt.step, "world_size": ckpt.world_size, "ep_size": ckpt.ep_size,
               "num_experts": ckpt.cfg.moe.num_experts, "tensors": len(state),
               "params": sum(v.numel() for v in state.values() if v.is_floating_point()),
               "note": "expert keys carry global expert ids (the ep_size=1 layout)"}
    meta = {"pad_moe": json.dumps({k: v for k, v in summary.items() if k != "note"})}
    tensors = {k: v.contiguous() for k, v in state.items()}
    out = os.path.abspath(out)
    if single:  # one file, written next to its target and renamed
        check_new_path(out, what="model")
        created, tmp = make_parents(out), None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
            os.close(fd)
            save_file(tensors, tmp, metadata=meta)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            remove_dirs(created)
            raise
        return summary
    with writer as tmp:
        save_file(tensors, os.path.join(tmp, CONSOLIDATED_FILE), metadata=meta)
        with open(os.path.join(tmp, CONSOLIDATED_META), "w") as f:
            json.dump(summary, f, indent=1)
        save_config(with_ep_size(ckpt.cfg, 1), os.path.join(tmp, "config.yaml"))
    return summary


def register(sub) -> argparse.ArgumentParser:
    """The ``padmoe consolidate`` subparser."""
    p = sub.add_parser("consolidate", help="full weights (every expert, global ids) of a checkpoint",
                       description="Write the full training-form weights of an expert-parallel checkpoint to one "
                                   ".safetensors file, or to a new folder (with consolidated.json and config.yaml).")
    p.add_argument("checkpoint", help="RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/TAG")
    p.add_argument("--out", required=True, help="a new .safetensors file, or a new folder")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    p.add_argument("--config", default=None, help="run config (default: RUN_DIR/config.yaml)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast floating tensors")
    p.set_defaults(handler=_consolidate_command)
    return p


def _consolidate_command(args) -> int:
    summary = consolidate(args.checkpoint, args.out, tag=args.tag, config=args.config, dtype=args.dtype)
    print(json.dumps({"out": os.path.abspath(args.out), **{k: summary[k] for k in ("step", "tensors", "params")}}))
    return 0


def consolidate_main(argv: Optional[list[str]] = None) -> int:
    """``padmoe consolidate CHECKPOINT_DIR --out FILE_OR_DIR [--tag T] [--config RUN.yaml] [--dtype fp32]``; returns
    the exit status (bad input: one line on stderr, 2)."""
    from pad_moe.commands import run_command

    return run_command(register, argv)
