"""Loading DeepSpeed checkpoint files safely: ``torch.load(weights_only=True)`` with an explicit allowlist.

Used by the trainer's engine (every file DeepSpeed's own load path reads) and by ``pad_moe.deploy`` (export,
consolidate, reshard), so that a tampered checkpoint can never run code.
"""

from __future__ import annotations

import contextlib

import torch
from safetensors.torch import load_file, save_file

from pad_moe.errors import UsageError


def checkpoint_safe_globals() -> list:
    """The non-tensor classes DeepSpeed pickles into its checkpoints (loss scaler, ZeRO stage, fragment addresses):
    the allowlist of every ``torch.load(weights_only=True)`` of a DeepSpeed checkpoint."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_load(path: str, map_location=None):
    """torch.load of a DeepSpeed checkpoint file with ``weights_only=True`` and only ``checkpoint_safe_globals``."""
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling, zip and EOF errors all mean: not a safe checkpoint file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UsageError(f"checkpoint file {path} cannot be loaded safely (torch.load weights_only=True: "
                         f"{type(err).__name__}: {first}); resume from another checkpoint or start a new run") from None


@contextlib.contextmanager
def weights_only_torch_load():
    """Inside the block every ``torch.load`` (DeepSpeed's universal-checkpoint converter and loader call it with
    ``weights_only=False``) runs as ``weights_only=True`` with ``checkpoint_safe_globals``."""
    original = torch.load

    def safe_load(f, map_location=None, *args, **kwargs):
        kwargs.pop("weights_only", None)
        with torch.serialization.safe_globals(checkpoint_safe_globals() + _universal_safe_globals()):
            return original(f, map_location, *args, weights_only=True, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


UNIVERSAL_BUFFERS = "pad_moe_buffers.safetensors"


def load_universal(engine, universal_dir: str, tag: str) -> None:
    """``engine.load_checkpoint`` of a ``to_universal`` folder (the engine built with ``checkpoint.load_universal``,
    at any expert-parallel size), every load weights-only, then the persistent buffers (PAD masks) it kept; a
    persistent buffer of the model missing from it or of another shape raises UsageError before anything loads."""
    import os

    path = os.path.join(universal_dir, tag, UNIVERSAL_BUFFERS)
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist; convert the checkpoint with pad_moe.checkpoint_io.to_universal")
    saved = load_file(path)
    persistent = {n: b for n, b in engine.module.named_buffers()
                  if n.rsplit(".", 1)[-1] not in _non_persistent(engine.module, n)}
    for name, buf in persistent.items():
        if name not in saved or tuple(saved[name].shape) != tuple(buf.shape):
            found = tuple(saved[name].shape) if name in saved else "missing"
            raise UsageError(f"universal checkpoint {universal_dir}/{tag}: buffer {name} is {found}, the model has "
                             f"{tuple(buf.shape)}; load it into the model it was written from")
    with weights_only_torch_load():
        engine.load_checkpoint(universal_dir, tag=tag)
    with torch.no_grad():
        for name, buf in persistent.items():
            buf.copy_(saved[name].to(buf.device))
    for module in engine.module.modules():
        if hasattr(module, "_on_masks_changed"):
            module._on_masks_changed()


def check_same_expert_layout(state: dict, ep_size: int, dp_world_size: int, where: str) -> None:
    """Refuse a plain (non-universal) load of an AutoEP checkpoint into another expert-parallel layout: DeepSpeed would
    load it and train on with fp32 master copies that no longer match the weights (silent divergence)."""
    saved_ep = {entry.get("ep_size") for entry in state.get("ds_autoep_layers") or []}
    saved_dp = state.get("dp_world_size")
    if saved_ep and (saved_ep != {ep_size} or saved_dp != dp_world_size):
        raise UsageError(f"checkpoint {where} was written at expert-parallel size {sorted(saved_ep)[0]} on "
                         f"{saved_dp} data-parallel ranks, this run has {ep_size} on {dp_world_size}; convert it with "
                         "pad_moe.checkpoint_io.to_universal and load it with load_universal")


def load_same_layout(engine, checkpoint_dir: str, tag: str) -> None:
    """``engine.load_checkpoint`` (weights-only) of a checkpoint written at this run's expert-parallel layout."""
    import os

    path = os.path.join(checkpoint_dir, tag, "mp_rank_00_model_states.pt")
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist; pass a DeepSpeed checkpoint folder and one of its tags")
    sizes = {m.ep_size for m in engine.module.modules() if getattr(m, "_is_autoep_layer", False)}
    check_same_expert_layout(weights_only_load(path), max(sizes, default=1), engine.dp_world_size, path)
    with weights_only_torch_load():
        engine.load_checkpoint(checkpoint_dir, tag=tag)


def _non_persistent(model, buffer_name: str) -> set:
    owner = model.get_submodule(buffer_name.rsplit(".", 1)[0]) if "." in buffer_name else model
    return set(getattr(owner, "_non_persistent_buffers_set", ()))


def _universal_safe_globals() -> list:
    """What DeepSpeed's universal conversion pickles besides ``checkpoint_safe_globals`` (its temp fragments)."""
    import argparse

    return [argparse.Namespace]


def to_universal(checkpoint_dir: str, tag: str, out_dir: str) -> str:
    """DeepSpeed's ``ds_to_universal`` of ``checkpoint_dir/tag`` into ``out_dir/tag`` (every load weights-only);
    ``out_dir`` must not exist. Returns the universal tag folder; load it with ``checkpoint.load_universal``."""
    import os
    from types import SimpleNamespace

    from deepspeed.checkpoint import ds_to_universal

    source = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(source):
        raise UsageError(f"checkpoint {source} does not exist; pass a DeepSpeed checkpoint folder and one of its tags")
    if os.path.exists(out_dir):
        raise UsageError(f"{out_dir} already exists; pass a new folder for the universal checkpoint")
    target = os.path.join(out_dir, tag)
    args = SimpleNamespace(input_folder=source, output_folder=target, num_extract_workers=1, num_merge_workers=1,
                           keep_temp_folder=False, strict=True, inject_missing_state=False)
    with weights_only_torch_load():
        ds_to_universal.main(args)
    # The universal loader restores parameters only: keep the buffers (PAD masks) for load_universal.
    state = weights_only_load(os.path.join(source, "mp_rank_00_model_states.pt"))
    buffers = {name: state["module"][name].contiguous() for name in state.get("buffer_names", [])}
    save_file(buffers, os.path.join(target, UNIVERSAL_BUFFERS))
    with open(os.path.join(out_dir, "latest_universal"), "w") as f:
        f.write(tag)
    with open(os.path.join(out_dir, "latest"), "w") as f:
        f.write(tag)
    return target
